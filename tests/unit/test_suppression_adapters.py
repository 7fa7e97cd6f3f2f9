"""Host adapters driven with fake transformer_options (no ComfyUI): DiT dispatch, wrappers, helpers."""

import pytest
import torch
from pack_import import pack_module as load

from erasers.guards import token_suppress as ts

hooks = load("nodes.suppression_hooks")


def test_cond_rows_and_state_copy():
    assert hooks.cond_rows([1, 0], 4).tolist() == [2, 3]
    assert hooks.cond_rows([0], 2).tolist() == [0, 1]
    to = {"cond_or_uncond": [1, 0]}
    a = hooks.with_state(to, token_bias=torch.ones(2, 3))
    b = hooks.with_state(a, token_bias=torch.ones(2, 3), nag={"x": 1})
    assert hooks.STATE_KEY not in to and a[hooks.STATE_KEY]["token_bias"].sum() == 6
    assert b[hooks.STATE_KEY]["token_bias"].sum() == 12 and len(b[hooks.STATE_KEY]["nag"]) == 1


def test_unet_sites_from_keys():
    keys = [
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.middle_block.1.transformer_blocks.2.attn2.to_k.weight",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight",
    ]
    assert hooks.unet_attn2_sites(keys) == [("input", 1, 0), ("middle", 0, 2)]


def fake_flux_double_block(q, k, v, heads):
    """Stands for a Flux double block: joint attention over cat(txt, img) through the host's wrap_attn."""

    def host_attention(q, k, v, heads, mask=None, skip_reshape=False, **kw):
        b, h, length, d = q.shape
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, h * d)

    def original_block(args):
        to = args["transformer_options"]
        override = to.get("optimized_attention_override")
        if override is None:
            out = host_attention(q, k, v, heads, skip_reshape=True)
        else:
            out = override(host_attention, q, k, v, heads, skip_reshape=True, mask=None, transformer_options=to)
        return {"img": out, "txt": args["txt"]}

    return original_block


def test_dit_token_bias_only_touches_image_rows_of_the_positive_branch():
    B, H, T, N, D = 2, 2, 5, 7, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T + N, D, generator=gen) for _ in range(3))
    block = fake_flux_double_block(q, k, v, H)
    args = {
        "img": torch.zeros(B, N, 4),
        "txt": torch.zeros(B, T, 4),
        "vec": torch.zeros(B, 4),
        "transformer_options": {},
    }
    plain = block(args)["img"]
    dispatch = hooks.DitDispatch("flux", "double", 0)
    assert torch.equal(dispatch(args, {"original_block": block})["img"], plain)  # no state → untouched
    mask = torch.zeros(T, dtype=torch.bool)
    mask[2] = True
    bias = torch.stack([torch.zeros(T), ts.logit_bias(mask, 0.0)])
    args["transformer_options"] = {hooks.STATE_KEY: {"token_bias": bias, "txt_len": T}}
    out = dispatch(args, {"original_block": block})["img"]
    assert torch.allclose(out[0], plain[0], atol=1e-6)  # negative row
    assert torch.allclose(out[1, :T], plain[1, :T], atol=1e-6)  # text queries of the positive row
    assert not torch.allclose(out[1, T:], plain[1, T:], atol=1e-4)
    # image queries of the positive row == attention with column 2 dropped
    qs = q[1:].transpose(1, 2).reshape(1, T + N, H * D)
    ks = k[1:].transpose(1, 2).reshape(1, T + N, H * D)
    vs = v[1:].transpose(1, 2).reshape(1, T + N, H * D)
    keep = torch.ones(T + N, dtype=torch.bool)
    keep[2] = False
    expected = ts.attention(qs[:, T:], ks[:, keep], vs[:, keep], H)
    assert torch.allclose(out[1:, T:], expected, atol=1e-5)


def test_safree_wrapper_swaps_only_the_matching_positive_prompt():
    from erasers.guards.safree import SafreeResult

    prompt = torch.randn(6, 4)
    projected = prompt.clone()
    projected[2] = 0
    res = SafreeResult(projected, torch.tensor([True]), [2], torch.ones(1), changed=True)
    w = hooks.make_safree_wrapper(res, prompt, 100.0, 0.0, negative_ref=None)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        seen["ctx"] = c_crossattn
        return x

    other = torch.randn(6, 4)
    ctx = torch.stack([other, prompt])  # [uncond, cond]
    w(executor, torch.zeros(2), torch.tensor([5.0, 5.0]), None, ctx, None, {"cond_or_uncond": [1, 0]})
    assert torch.equal(seen["ctx"][0], other) and torch.equal(seen["ctx"][1], projected)
    ctx2 = torch.stack([other, other + 1])  # a different positive prompt: untouched, same object
    w(executor, torch.zeros(2), torch.tensor([5.0, 5.0]), None, ctx2, None, {"cond_or_uncond": [1, 0]})
    assert seen["ctx"] is ctx2
    w(executor, torch.zeros(2), torch.tensor([500.0, 500.0]), None, ctx, None, {"cond_or_uncond": [1, 0]})
    assert seen["ctx"] is ctx  # outside the window


def test_hidream_safree_wrapper_projects_each_stream_in_its_own_window_on_the_matching_positive_row():
    """HiDream: the T5 context and each Llama layer's rows are swapped for their projections while σ is in
    that stream's own window; the negative row and a row of another prompt are untouched."""
    from erasers.guards.safree import SafreeResult

    t5, llama = torch.randn(5, 4), torch.randn(3, 6, 8)  # (T, D) and (layers, R, D)
    t5_new, l0_new, l2_new = t5 + 1, llama[0] * 0, llama[2] + 2
    t5_res = SafreeResult(t5_new, torch.tensor([True]), [1], torch.ones(1), changed=True)
    l0 = SafreeResult(l0_new, torch.tensor([True]), [1], torch.ones(1), changed=True)
    l2 = SafreeResult(l2_new, torch.tensor([True]), [1], torch.ones(1), changed=True)
    l1 = SafreeResult(llama[1], torch.tensor([False]), [1], torch.ones(1))
    windows = {0: (100.0, 0.0), 1: (100.0, 0.0), 2: (100.0, 10.0)}  # layer 2: only while σ ≥ 10
    w = hooks.make_hidream_safree_wrapper(t5_res, (100.0, 0.0), {0: l0, 1: l1, 2: l2}, windows, t5, llama)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        seen.update(ctx=c_crossattn, llama=kw["encoder_hidden_states_llama3"])
        return x

    other_t5, other_llama = torch.randn(5, 4), torch.randn(3, 6, 8)
    ctx, states = torch.stack([other_t5, t5]), torch.stack([other_llama, llama])  # [uncond, cond]
    to = {"cond_or_uncond": [1, 0]}
    w(executor, torch.zeros(2), torch.tensor([50.0, 50.0]), None, ctx, None, to, encoder_hidden_states_llama3=states)
    assert torch.equal(seen["ctx"][1], t5_new) and torch.equal(seen["ctx"][0], other_t5)
    assert torch.equal(seen["llama"][1, 0], l0_new) and torch.equal(seen["llama"][1, 2], l2_new)
    assert torch.equal(seen["llama"][1, 1], llama[1]) and torch.equal(seen["llama"][0], other_llama)
    w(executor, torch.zeros(2), torch.tensor([5.0, 5.0]), None, ctx, None, to, encoder_hidden_states_llama3=states)
    assert torch.equal(seen["llama"][1, 2], llama[2]) and torch.equal(seen["llama"][1, 0], l0_new)  # σ < 10
    mismatched = torch.stack([other_llama, llama + 1])  # the T5 rows match, the Llama rows are another prompt's
    w(
        executor,
        torch.zeros(2),
        torch.tensor([50.0, 50.0]),
        None,
        ctx,
        None,
        to,
        encoder_hidden_states_llama3=mismatched,
    )
    assert seen["ctx"] is ctx and seen["llama"] is mismatched


def test_safree_keywords_as_negative_refuses_a_negative_it_cannot_replace():
    """keywords_as_negative was asked for: a negative row whose length is no multiple of the keywords'
    encoding (a keyword list longer than one 77-token chunk) stops the run; with pass-through it warns once
    and samples that row as given — never a silent skip."""
    from erasers.guards.safree import SafreeResult

    ErasureNotApplied = load("nodes.fail_closed").ErasureNotApplied
    prompt = torch.randn(77, 4)
    res = SafreeResult(prompt.clone(), torch.tensor([False]), [], torch.ones(1), changed=False)
    keywords = torch.randn(154, 4)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        seen["ctx"] = c_crossattn
        return x

    ctx = torch.stack([torch.randn(77, 4), prompt])  # [uncond, cond]
    args = (executor, torch.zeros(2), torch.tensor([5.0, 5.0]), None, ctx, None, {"cond_or_uncond": [1, 0]})
    with pytest.raises(ErasureNotApplied, match="keywords_as_negative"):
        hooks.make_safree_wrapper(res, prompt, 100.0, 0.0, negative_ref=keywords)(*args)
    lenient = hooks.make_safree_wrapper(res, prompt, 100.0, 0.0, negative_ref=keywords, allow_pass_through=True)
    lenient(*args)
    assert seen["ctx"] is ctx
    fits = hooks.make_safree_wrapper(res, prompt, 100.0, 0.0, negative_ref=keywords[:77])
    fits(*args)
    assert torch.equal(seen["ctx"][0], keywords[:77]) and torch.equal(seen["ctx"][1], prompt)


def test_step_index():
    sig = torch.tensor([10.0, 5.0, 1.0, 0.0])
    assert hooks.step_index(torch.tensor([5.0]), sig) == (1, 3)
    assert hooks.step_index(torch.tensor([5.0]), None) == (-1, 0)


def test_dit_bias_folds_into_a_mask_the_model_brings():
    B, H, T, N, D = 2, 2, 3, 4, 8
    q = torch.zeros(B, H, T + N, D)
    bias = torch.stack([torch.zeros(T), ts.logit_bias(torch.tensor([False, True, False]), 0.5)])
    allowed = torch.ones(T + N, T + N, dtype=torch.bool)
    allowed[0, 1] = False  # the model's own mask: text query 0 may not see text key 1
    folded = hooks.DitDispatch.folded_mask(q, allowed, bias, T, skip_reshape=True)
    assert folded.shape == (B, 1, T + N, T + N)
    assert torch.isinf(folded[:, 0, 0, 1]).all()  # the model's mask is kept
    assert torch.allclose(folded[1, 0, T:, 1], torch.full((N,), -0.6931), atol=1e-4)  # image rows × concept col
    assert folded[1, 0, :T, 1:].eq(0).sum() == T * (T + N - 1) - 1  # text rows get no bias
    assert folded[0].isfinite().sum() == (T + N) ** 2 - 1  # the negative row: only the model's mask
    additive = torch.zeros(B, T + N, T + N)
    assert torch.equal(
        hooks.DitDispatch.folded_mask(q, additive, bias, T, skip_reshape=True)[:, 0, T:, :T],
        bias[:, None, :].expand(B, N, T),
    )


def test_dit_row_selection_is_a_view_for_consecutive_rows_and_a_gather_otherwise():
    t = torch.arange(24.0).reshape(4, 6)
    view = hooks._take(t, [1, 2])
    assert view.data_ptr() == t[1].data_ptr() and torch.equal(view, t[1:3])
    assert torch.equal(hooks._take(t, [0, 3]), t[[0, 3]])
