"""Token suppression in the newer families' layouts, on tiny tensors (no host), and the family table's guard
statements.

Attention probabilities are read off directly: with one head and v = the identity over the keys, the
attention output of a query *is* its row of softmax probabilities, so "the concept's attention mass" is a
sum of output entries.
"""

from pathlib import Path

import pytest
import torch
from pack_import import pack_module

from erasers import families
from erasers.errors import UnsupportedFamily
from erasers.guards import joint
from erasers.guards import token_suppress as ts

hooks = pack_module("nodes.suppression_hooks")

# -- the user's words inside the host's tokenization ------------------------------------------------------

T5_EOS, PAD = 1, 0
HEAD, TAIL = [151644, 872, 198], [151645, 198, 151644, 77091, 198]  # Qwen-style chat template ids
QWEN_PAD = 151643


@pytest.mark.parametrize(
    "ids, empty, span",
    [
        ([10, 11, 12, T5_EOS], [T5_EOS], (0, 3)),  # Chroma's T5: no padding, </s> at the end
        ([10, 11, T5_EOS] + [PAD] * 509, [T5_EOS] + [PAD] * 511, (0, 2)),  # Wan's UMT5, padded to 512
        (HEAD + [10, 11] + TAIL, HEAD + TAIL, (3, 5)),  # Qwen-Image / Z-Image: template kept
        (HEAD + [10] + TAIL + [QWEN_PAD] * 100, HEAD + TAIL + [QWEN_PAD] * 101, (3, 4)),  # Flux.2-klein: padded
        ([2, 10, 11, 12], [2], (1, 4)),  # Lumina 2's Gemma: BOS only, nothing after
        (HEAD + TAIL, HEAD + TAIL, (8, 8)),  # the empty prompt has no words of its own
    ],
)
def test_word_span_is_what_the_text_adds_to_the_hosts_template(ids, empty, span):
    assert joint.word_span(ids, empty) == span
    assert joint.word_ids(ids, empty) == ids[span[0] : span[1]]


def test_a_word_equal_to_a_template_token_is_still_the_texts():
    # the text's last word is the template's closing id: the span still covers it (suffix matched from the end)
    assert joint.word_span(HEAD + [10, 151645] + TAIL, HEAD + TAIL) == (3, 5)


def test_dropped_head_is_what_the_encoder_removed_in_front():
    assert joint.dropped_head(20, 17) == 3 and joint.dropped_head(17, 17) == 0 and joint.dropped_head(5, 9) == 0


# -- joint attention: image queries lose the concept's text-key columns, nothing else changes --------------


def probs_fn(q, k, v, heads, mask=None):
    """Single-head attention on (B, L, D) tensors through SDPA, with the (B, 1, 1|Lq, Lk) additive mask."""
    out = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)
    return out[:, 0]


def joint_case(seed=0, txt=6, img=10, d=8, batch=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, txt + img, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, txt + img, d, generator=gen, dtype=torch.float64)
    v = torch.eye(txt + img, dtype=torch.float64).expand(batch, -1, -1)  # output row = its probabilities
    return q, k, v


def run_joint(q, k, v, bias, text_start, image_start, mask=None):
    columns = joint.joint_column_bias(bias, q.shape[1], text_start)
    return joint.joint_suppressed_attention(q, k, v, 1, columns, image_start, probs_fn, 1, 1, mask)


@pytest.mark.parametrize("text_start, context, image_start", [(0, 6, 6), (0, 4, 6), (2, 4, 6)])
def test_image_queries_lose_the_concepts_columns_and_keep_the_rest_in_proportion(text_start, context, image_start):
    """text_start 0 / context = text block: Chroma, Flux.2, Qwen-Image; context shorter than the block, at its
    start: Lumina 2 / Z-Image (caption padding after it); at its end: SD3's registers in front."""
    q, k, v = joint_case()
    plain = probs_fn(q, k, v, 1)
    concept = [1, 2]
    bias = ts.logit_bias(torch.tensor([i in concept for i in range(context)]), 0.0)[None].expand(2, -1)
    out = run_joint(q, k, v, bias, text_start, image_start)
    cols = [text_start + c for c in concept]
    rest = [j for j in range(q.shape[1]) if j not in cols]
    img = slice(image_start, None)
    assert out[:, img][..., cols].abs().max() < 1e-12, "the image queries still attend to the concept"
    # every other column keeps its share, renormalised: p′_j = p_j / (1 − mass of the concept)
    renorm = plain[:, img][..., rest] / (1 - plain[:, img][..., cols].sum(-1, keepdim=True))
    torch.testing.assert_close(out[:, img][..., rest], renorm, rtol=1e-9, atol=1e-12)
    # text queries are untouched: the same attention call on the same rows
    assert torch.equal(out[:, :image_start], probs_fn(q[:, :image_start], k, v, 1))
    torch.testing.assert_close(out[:, :image_start], plain[:, :image_start], rtol=0, atol=1e-12)


def test_image_first_layout_biases_only_the_image_queries_in_front():
    """HiDream: [image (10) ‖ T5 (3) ‖ Llama initial (3)]; the text queries after the image attend as before."""
    q, k, v = joint_case(4)
    plain = probs_fn(q, k, v, 1)
    columns = torch.zeros(2, 16)
    columns[:, [11, 14]] = ts.DROP_BIAS  # the concept's T5 row and its Llama row
    out = joint.joint_suppressed_attention(q, k, v, 1, columns, 0, probs_fn, 1, 1, None, image_end=10)
    assert out[:, :10][..., [11, 14]].abs().max() < 1e-12
    rest = [j for j in range(16) if j not in (11, 14)]
    renorm = plain[:, :10][..., rest] / (1 - plain[:, :10][..., [11, 14]].sum(-1, keepdim=True))
    torch.testing.assert_close(out[:, :10][..., rest], renorm, rtol=1e-9, atol=1e-12)
    assert torch.equal(out[:, 10:], probs_fn(q[:, 10:], k, v, 1))
    with pytest.raises(ValueError, match=r"image queries \[0, 17\) do not fit a sequence of 16"):
        joint.joint_suppressed_attention(q, k, v, 1, columns, 0, probs_fn, 1, 1, None, image_end=17)


def test_a_factor_scales_the_odds_of_the_concepts_columns_by_exactly_c():
    q, k, v = joint_case(1)
    plain = probs_fn(q, k, v, 1)
    c = 0.25
    bias = ts.logit_bias(torch.tensor([False, False, True, False, False, False]), c)[None].expand(2, -1)
    out = run_joint(q, k, v, bias, 0, 6)
    odds = lambda p: p[:, 6:, 2] / p[:, 6:, 0]  # noqa: E731  (concept column vs a kept text column)
    torch.testing.assert_close(odds(out), c * odds(plain), rtol=1e-6, atol=0)  # log c is float32


def test_zero_bias_is_bit_identical_and_per_row_bias_leaves_other_rows_alone():
    q, k, v = joint_case(2)
    zero = torch.zeros(2, 6)
    out = run_joint(q, k, v, zero, 0, 6)
    assert torch.equal(out[:, 6:], probs_fn(q[:, 6:], k, v, 1, mask=torch.zeros(2, 1, 1, 16, dtype=q.dtype)))
    torch.testing.assert_close(out, probs_fn(q, k, v, 1), rtol=0, atol=1e-12)
    # the bias on row 0 only (the positive branch): row 1 (the negative) attends as before
    bias = torch.zeros(2, 6)
    bias[0, 3] = ts.DROP_BIAS
    out = run_joint(q, k, v, bias, 0, 6)
    torch.testing.assert_close(out[1], probs_fn(q, k, v, 1)[1], rtol=0, atol=1e-12)
    assert out[0, 6:, 3].abs().max() < 1e-12 and out[0, :6, 3].abs().min() > 0


def test_the_models_own_mask_is_kept_for_every_query():
    """Qwen-Image passes an additive text mask (B, 1, L); a bool mask (True = attend) works the same."""
    q, k, v = joint_case(3)
    host = torch.zeros(2, 1, 16, dtype=q.dtype)
    host[:, 0, 5] = float("-inf")  # the model masks text column 5 (padding)
    bias = ts.logit_bias(torch.tensor([False, True, False, False, False, False]), 0.0)[None].expand(2, -1)
    for mask in (host, host == 0):
        out = run_joint(q, k, v, bias, 0, 6, mask)
        assert out[..., 5].abs().max() == 0, "the model's masked column came back"
        assert out[:, 6:, 1].abs().max() < 1e-12 and out[:, :6, 1].abs().min() > 0
        torch.testing.assert_close(out[:, :6], probs_fn(q[:, :6], k, v, 1, joint.additive_mask(host, q.dtype)))


def test_the_text_block_must_fit_the_joint_sequence():
    with pytest.raises(ValueError, match="does not fit a joint sequence of 8"):
        joint.joint_column_bias(torch.zeros(1, 6), 8, 4)


def test_wan_cross_attention_every_frames_queries_lose_the_concept():
    """Wan: the keys are the 512 text rows (here 12), the queries every token of every latent frame."""
    frames, per_frame, text, d = 3, 4, 12, 8
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, frames * per_frame, d, generator=gen, dtype=torch.float64)
    k = torch.randn(1, text, d, generator=gen, dtype=torch.float64)
    v = torch.eye(text, dtype=torch.float64)[None]
    mask = torch.zeros(text, dtype=torch.bool)
    mask[[2, 3]] = True
    plain = probs_fn(q, k, v, 1)
    out = ts.suppressed_attention(q, k, v, 1, ts.logit_bias(mask, 0.0)[None], lambda *a, mask=None: probs_fn(*a, mask))
    assert out[0, :, [2, 3]].abs().max() < 1e-12  # every frame
    keep = [j for j in range(text) if j not in (2, 3)]
    torch.testing.assert_close(out[0][:, keep], plain[0][:, keep] / plain[0][:, keep].sum(-1, keepdim=True))


# -- the host glue's layout pieces (fake tensors, no ComfyUI) --------------------------------------------


def test_a_left_padded_prompt_is_located_and_its_positions_shifted():
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(5, 4, generator=gen)
    row = torch.cat([torch.zeros(7, 4), ref])  # Flux.2 pads the context to its length on the left
    assert hooks.locate(ref, ref) == 0 and hooks.locate(row, ref) == 7
    assert hooks.locate(torch.cat([torch.ones(7, 4), ref]), ref) is None  # not padding: another prompt
    concept = torch.randn(1, 4, generator=gen)
    hit = hooks.token_mask_for_row(row, concept, 0.999, False, ref, [2], 5, skip_first=True)
    assert torch.nonzero(hit).flatten().tolist() == [9]
    hit = hooks.token_mask_for_row(row, concept, 0.999, True, ref, [2], 4, skip_first=True)
    assert torch.nonzero(hit).flatten().tolist() == [9, 10, 11]  # EOS rule: from the prompt's end on


class Spy:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
        self.calls.append((q.shape[2], rest, mask))
        b, h, length, d = q.shape
        m = rest[0] if rest else mask
        if m is not None and m.ndim == 3:
            m = m[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return out.transpose(1, 2).reshape(b, length, h * d)


def test_the_model_level_override_acts_only_at_the_joint_length_and_keeps_a_positional_mask():
    """Lumina 2 / Z-Image: the caption refiner (text only) and the noise refiner (image only) pass through;
    the main layers (caption padded to 8 ‖ image) get the bias; the mask they pass positionally is kept."""
    state = {"token_bias": torch.tensor([[0.0, ts.DROP_BIAS, 0.0]]), "acted": [0]}
    override = hooks.ModelLevelJoint(joint_len=8 + 6, image_start=8, state=state)
    spy = Spy()
    gen = torch.Generator().manual_seed(6)
    for length in (8, 6):  # the refiners
        q = torch.randn(1, 2, length, 4, generator=gen)
        assert torch.equal(
            override(spy, q, q, q, 2, None, skip_reshape=True), spy(q, q, q, 2, None, skip_reshape=True)
        )
    assert state["acted"] == [0]
    q = torch.randn(1, 2, 14, 4, generator=gen)
    host_mask = torch.zeros(1, 1, 14)
    out = override(spy, q, q, q, 2, host_mask, skip_reshape=True)
    assert state["acted"] == [1] and out.shape == (1, 14, 8)
    text_call, image_call = spy.calls[-2:]
    assert text_call[0] == 8 and image_call[0] == 6  # text queries, then image queries
    assert image_call[2][0, 0, 0, 1] == ts.DROP_BIAS and image_call[2][0, 0, 0, [0, 2, 3]].abs().max() == 0
    assert text_call[2].shape[-1] == 14 and text_call[2].abs().max() == 0  # the model's mask, no bias


def test_the_hidream_override_biases_t5_and_both_llama_blocks_for_the_image_queries_only():
    """HiDream: [image 6 ‖ T5 4 ‖ Llama initial 3 ‖ Llama layer i 3] as (B, L, H·D) (the host's layout); the
    (B, T5 + R) bias lands on the T5 keys and on both Llama key blocks; another length passes through."""
    bias = torch.zeros(1, 4 + 3)
    bias[0, 1] = bias[0, 4 + 2] = ts.DROP_BIAS  # the concept's T5 row 1 and its Llama row 2
    state = {"token_bias": bias, "acted": [0]}
    override = hooks.ImageFirstJoint(image_len=6, t5_len=4, llama_len=3, state=state)
    seen = []

    def host(q, k, v, heads, mask=None, skip_reshape=False, **kw):
        seen.append((q.shape[1], mask))
        b, length, _ = q.shape
        split = lambda t: t.view(b, -1, heads, 2).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)

    gen = torch.Generator().manual_seed(7)
    other = torch.randn(1, 10, 4, generator=gen)
    assert torch.equal(override(host, other, other, other, 2), host(other, other, other, 2)) and state["acted"] == [0]
    q, k, v = (torch.randn(1, 16, 4, generator=gen) for _ in range(3))
    out = override(host, q, k, v, 2)
    assert state["acted"] == [1] and out.shape == (1, 16, 4)
    (n_img, img_mask), (n_txt, txt_mask) = seen[-2:]
    assert (n_img, n_txt, txt_mask) == (6, 10, None)  # image queries first, then the text queries unbiased
    assert torch.nonzero(img_mask[0, 0, 0] < 0).flatten().tolist() == [6 + 1, 10 + 2, 13 + 2]
    torch.testing.assert_close(out[:, 6:], host(q[:, 6:], k, v, 2))


def _host_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
    """ComfyUI's optimized_attention contract: (B, L, H·D) or, with skip_reshape, (B, H, L, D) in and out."""
    if not skip_reshape:
        q, k, v = (t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _masked_attention(q, k, v, heads, allowed):
    """Reference: (B, L, H·D) attention of every query over the key positions ``allowed[query]`` only."""
    b, length, _ = q.shape
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    mask = torch.full((length, k.shape[1]), float("-inf"))
    for row, cols in allowed.items():
        mask[row, cols] = 0.0
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, length, -1)


def test_the_hidream_override_keeps_each_text_stream_apart_and_guides_the_image_queries():
    """Concept guidance on HiDream: [image 3 ‖ T5 prompt 2, concept 2 ‖ Llama initial prompt 2, concept 1 ‖
    Llama layer prompt 2, concept 1]. The prompt's text queries see [image, prompt] keys and the concept's
    [image, concept] — each as in a call with that text alone —, the image queries give Z⁺ over [image,
    prompt] and, on the guided row only, NAG(Z⁺, Z⁻ over [image, concept])."""
    from erasers.guards import concept_guidance as cg

    image, prompt, concept = [0, 1, 2], [3, 4, 7, 8, 10, 11], [5, 6, 9, 12]
    op = {"phi": 5.0, "tau": 2.5, "alpha": 0.5, "rows": torch.tensor([0])}
    state = {"nag": [op]}
    override = hooks.ImageFirstJoint(3, 2, 2, state, None, [(2, 1)])
    assert override.length == 13
    assert override.stream_columns(0, "cpu").tolist() == prompt
    assert override.stream_columns(1, "cpu").tolist() == concept
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 13, 8, generator=gen) for _ in range(3))
    out = override(_host_attention, q, k, v, 2)
    assert override.calls == 1 and out.shape == (2, 13, 8)
    streams = {**{r: image + prompt for r in image + prompt}, **{r: image + concept for r in concept}}
    plain = _masked_attention(q, k, v, 2, streams)
    negative = _masked_attention(q, k, v, 2, {r: image + concept for r in range(13)})
    torch.testing.assert_close(out[:, 3:], plain[:, 3:], rtol=1e-5, atol=1e-5)  # text streams apart, exact
    torch.testing.assert_close(out[1, :3], plain[1, :3], rtol=1e-5, atol=1e-5)  # unguided row: Z⁺
    guided = cg.nag(plain[:1, :3], negative[:1, :3], 5.0, 2.5, 0.5)
    torch.testing.assert_close(out[:1, :3], guided, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:1, :3], plain[:1, :3], atol=1e-3)  # NAG moved the guided row
    other = torch.randn(2, 12, 8, generator=gen)  # another length passes through untouched
    assert torch.equal(override(lambda *a, **kw: a[0], other, other, other, 2), other) and override.calls == 1


def test_the_hidream_wrapper_appends_the_concepts_rows_and_stops_when_no_attention_has_the_layout():
    wrapper = hooks.make_hidream_joint_wrapper()
    neg, neg_llama = torch.randn(1, 3, 4), torch.randn(1, 2, 5, 6)
    op = {"phi": 5.0, "tau": 2.5, "alpha": 0.25, "rows": torch.tensor([0]), "neg": neg, "neg_llama": neg_llama}
    seen = {}

    class Executor:
        class_obj = type("DM", (), {"patch_size": 2})()

        def __call__(self, x, t, y, context, llama, image_cond, control, to):
            seen.update(context=context, llama=llama, override=to["optimized_attention_override"])
            return x

    x, context, llama = torch.zeros(2, 16, 4, 6), torch.zeros(2, 7, 4), torch.zeros(2, 2, 9, 6)
    to = {hooks.STATE_KEY: {"nag": [op]}}
    with pytest.raises(RuntimeError, match="found none of HiDream-I1's joint attentions"):
        wrapper(Executor(), x, 1.0, None, context, llama, None, None, to)
    assert seen["context"].shape == (2, 10, 4) and torch.equal(seen["context"][1, 7:], neg[0])
    assert seen["llama"].shape == (2, 2, 14, 6) and torch.equal(seen["llama"][0, :, 9:], neg_llama[0])
    assert seen["override"].length == 2 * 3 + 10 + 2 * 14 and seen["override"].concepts == [(3, 5)]
    passed = {}
    plain = lambda x_, t_, y_, c_, l_, i_, k_, to_: passed.update(to=to_) or x_  # noqa: E731
    assert wrapper(plain, x, 1.0, None, context, llama, None, None, {}) is x and passed["to"] == {}  # nothing to do


def test_lumina_lengths_follow_the_hosts_padding():
    class Lumina:
        patch_size, pad_tokens_multiple = 2, None

    class ZImage(Lumina):
        pad_tokens_multiple = 32

    x = torch.zeros(1, 16, 10, 12)  # 5 × 6 patches
    assert hooks.lumina_lengths(Lumina, x, 17) == (17, 17 + 30)
    assert hooks.lumina_lengths(ZImage, x, 17) == (32, 32 + 32)


# -- the family table's guard statements --------------------------------------------------------------------

NEW = ("Chroma", "Flux2", "QwenImage", "Lumina2", "WAN21", "WAN22", "HiDream", "AuraFlow")


@pytest.mark.parametrize("record", [r for r in families.RECORDS if r.host_class in NEW])
def test_every_new_family_states_every_guard(record):
    stated = set(record.guards) | {g for g, _ in record.guard_refusals}
    assert stated == set(families.GUARDS), f"{record.label}: no statement for {set(families.GUARDS) - stated}"
    assert not set(record.guards) & {g for g, _ in record.guard_refusals}
    assert "token_suppression" in record.guards and record.guard_layout in families.record.GUARD_LAYOUTS


@pytest.mark.parametrize(
    "host, config, guard, needle",
    [
        ("Flux2", "Flux2", "sld", "Safe Latent Diffusion cannot serve Flux.2 (Flux2.*guidance-distilled"),
        ("Flux", "Flux", "sld", "cannot serve Flux.1 (Flux.*guidance-distilled"),
        ("Lumina2", "ZImage", "concept_guidance", "Concept guidance cannot serve Z-Image.*hook.*caption refiner"),
        ("WAN21", "WAN21_I2V", "token_suppression", "WAN21 is loaded with the config WAN21_I2V"),
        ("SDXLRefiner", "SDXLRefiner", "sld", "cannot serve SDXL refiner .SDXLRefiner"),
        ("CosmosPredict2", "X", "token_suppression", "CosmosPredict2 .config X. is not in the pack's family table"),
    ],
)
def test_a_guard_refuses_by_name_with_the_reason(host, config, guard, needle):
    with pytest.raises(UnsupportedFamily, match=needle.replace("(", r"\(") if "(" in needle else needle):
        families.lookup_guard(host, config, guard)


def test_the_served_families_are_the_ones_the_record_says():
    for host, config in (
        ("Chroma", "Chroma"),
        ("QwenImage", "QwenImage"),
        ("Lumina2", "ZImage"),
        ("WAN22", "WAN22_T2V"),
    ):
        assert families.lookup_guard(host, config, "sld").host_class == host
    assert families.lookup_guard("Flux2", "Flux2", "token_suppression").family.value == "flux2"
    assert families.lookup_guard("Chroma", "Chroma", "safree").family.value == "chroma"
    assert families.lookup_guard("WAN21", "WAN21_T2V", "safree").family.value == "wan"
    # SAFREE's decoder-LLM port (the prompt's own rows inside the host's chat template)
    for host, config, family in (
        ("Flux2", "Flux2", "flux2"),
        ("QwenImage", "QwenImage", "qwen_image"),
        ("Lumina2", "Lumina2", "lumina2"),
        ("Lumina2", "ZImage", "zimage"),
    ):
        assert families.lookup_guard(host, config, "safree").family.value == family
    assert families.lookup_guard("WAN22", "WAN22_T2V", "concept_guidance").family.value == "wan"
    # concept guidance through the host's own blocks (nodes/suppression_hooks.py host_block_guidance)
    for host, family in (("Chroma", "chroma"), ("Flux2", "flux2"), ("QwenImage", "qwen_image")):
        assert families.lookup_guard(host, host, "concept_guidance").family.value == family
    assert families.lookup_guard("HiDream", "HiDream", "sld").family.value == "hidream"
    assert families.lookup_guard("HiDream", "HiDream", "token_suppression").family.value == "hidream"


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_guards_column_says_what_the_table_says():
    section = README.read_text(encoding="utf-8").split("### Newer families (#16)", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    for record in (r for r in families.RECORDS if r.host_class in NEW):
        row = next(r for r in rows if f"`{record.host_class}`" in r[0] and record.label.split(" ")[0] in r[0])
        cell = row[4]
        for guard in families.GUARDS:
            label = families.GUARD_LABELS[guard]
            served = record.guard_reason(guard) is None
            assert (f"{label} ✓" in cell) == served, (record.label, guard, cell)


class FakeWanBlock:
    """A Wan block's attention calls as WanAttentionBlock makes them: self-attention on x, then cross-attention
    of x to its own projection of ``txt`` (here k = v = txt), both through the transformer_options override."""

    def __init__(self, calls=2):
        self.calls, self.seen_txt = calls, None

    def __call__(self, args):
        to, x, txt = args["transformer_options"], args["img"], args["txt"]
        self.seen_txt = txt
        override = to.get("optimized_attention_override")

        def attention(q, k, v, heads, mask=None, **kw):
            return ts.attention(q, k, v, heads, mask)

        def call(q, k, v):
            return override(attention, q, k, v, heads=2) if override else attention(q, k, v, 2)

        out = call(x, x, x)
        if self.calls > 1:
            out = out + call(x, txt, txt)
        return {"img": out}


class FakeWanModel:
    class diffusion_model:  # noqa: N801
        text_embedding = staticmethod(lambda ctx: ctx * 2.0)


def test_wan_dispatch_appends_the_concept_and_splits_it_off_in_the_cross_attention():
    gen = torch.Generator().manual_seed(7)
    x, txt, neg = (torch.randn(2, n, 8, generator=gen) for n in (6, 5, 4))
    bias = torch.zeros(2, 5)
    bias[0, 1] = ts.DROP_BIAS
    op = {"neg": neg[:1], "rows": torch.tensor([0]), "phi": 5.0, "tau": 2.5, "alpha": 0.25, "stream": {}}
    state = {"token_bias": bias, "nag": [op], "model": FakeWanModel, "acted": [0]}
    block = FakeWanBlock()
    dispatch = hooks.DitDispatch("wan", "double", 0)
    out = dispatch({"img": x, "txt": txt, "transformer_options": {hooks.STATE_KEY: state}}, {"original_block": block})
    assert block.seen_txt.shape == (2, 9, 8)  # the prompt's 5 rows, then text_embedding(concept)'s 4
    torch.testing.assert_close(block.seen_txt[:, 5:], (neg[:1] * 2.0).expand(2, -1, -1))
    z_pos = ts.suppressed_attention(x, txt, txt, 2, bias)
    z_neg = ts.attention(x[:1], neg[:1] * 2.0, neg[:1] * 2.0, 2)
    expected = ts.attention(x, x, x, 2) + z_pos
    expected[0] = ts.attention(x[:1], x[:1], x[:1], 2)[0] + hooks.cg.nag(z_pos[:1], z_neg, 5.0, 2.5, 0.25)[0]
    torch.testing.assert_close(out["img"], expected)
    assert state["acted"] == [1]
    # no state: the block as the host runs it
    plain = dispatch({"img": x, "txt": txt, "transformer_options": {}}, {"original_block": FakeWanBlock()})
    assert torch.equal(plain["img"], FakeWanBlock()({"img": x, "txt": txt, "transformer_options": {}})["img"])


def test_wan_dispatch_stops_when_the_block_has_no_cross_attention_it_recognises():
    x, txt = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    state = {"token_bias": torch.full((1, 5), ts.DROP_BIAS), "acted": [0]}
    to = {hooks.STATE_KEY: state}
    with pytest.raises(RuntimeError, match="found no cross-attention in Wan block 3"):
        hooks.DitDispatch("wan", "double", 3)(
            {"img": x, "txt": txt, "transformer_options": to}, {"original_block": FakeWanBlock(1)}
        )
    wrong = {"token_bias": torch.full((1, 7), ts.DROP_BIAS), "acted": [0]}
    with pytest.raises(RuntimeError, match="second attention to be its cross-attention"):
        hooks.DitDispatch("wan", "double", 0)(
            {"img": x, "txt": txt, "transformer_options": {hooks.STATE_KEY: wrong}}, {"original_block": FakeWanBlock()}
        )
