"""Concept guidance (NAG) on Chroma, Flux.2, Qwen-Image and AuraFlow, on tiny instances of ComfyUI's own classes.

On these families the concept's text stream runs through the host's own blocks: appended to the prompt's
text in the block's one pass (``DitDispatch.inline_guidance``), or, the reference, in an extra pass of each
block for the guided rows with [concept stream ‖ the same image stream] (``two_pass_guidance``).
Checked, against ComfyUI's own sampler:

* the one-pass path samples what the two-pass reference samples (every block, cfg > 1, alone and with token
  suppression), and its Z⁻ equals the reference's at every call;

* Z⁻ is what the paper defines: in the first block it equals the image queries' attention output of the
  unpatched model run with the concept as the prompt (same latent, same σ) — the concept encoded, padded
  (Flux.2: left to 512) and projected as the host does a prompt, with the model's own rotary positions;
* NAG mixes it into the positive rows only: every call guides the cond rows' image queries (every block,
  double and single), with Z⁻ shaped as Z⁺; at cfg > 1 the uncond rows are never guided;
* strength 0 is bit-identical; guidance changes the output; it composes with token suppression;
* a text attention mask (which the host's blocks apply at the prompt's length only) stops sampling at
  the first step instead of guiding wrongly.

Skipped without COMFYUI_PATH (or on a ComfyUI without these classes).
"""

from __future__ import annotations

import os

import pytest
import torch
from suppression_models import comfy, pack, run_node  # noqa: F401  (comfy, pack are fixtures)
from test_closed_form_families_comfy import ALL_FAMILIES, build
from test_guards_new_families_comfy import LATENT, PROMPT, guard_clip, guidance_node, sample, tokens_node

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

GUIDED = ("chroma", "flux2", "qwen_image", "auraflow")
#: the families with the two-pass reference path (AuraFlow's concept stream rides in the one pass only)
TWO_PASS = ("chroma", "flux2", "qwen_image")
#: the concept the tests' guidance node erases (suppression_models.makers: concepts="nude")
CONCEPT = "nude"


@pytest.fixture(scope="module", params=GUIDED)
def family(request, comfy):
    import comfy.model_base as mb

    host = ALL_FAMILIES[request.param][0]
    if not hasattr(mb, host):
        pytest.skip(f"this ComfyUI has no {host} class")
    patcher, clip, _ = build(comfy, request.param)
    return request.param, patcher, guard_clip(clip)


def blocks_of(name, dm) -> int:
    if name == "qwen_image":
        return len(dm.transformer_blocks)
    if name == "auraflow":
        return len(dm.double_layers) + len(dm.single_layers)
    return len(dm.double_blocks) + len(dm.single_blocks)


@pytest.fixture
def nag_calls(pack, monkeypatch):
    _, hooks = pack
    seen = []
    nag = hooks.cg.nag

    def spy(z_pos, z_neg, *a):
        seen.append((z_pos.detach().clone(), z_neg.detach().clone()))
        return nag(z_pos, z_neg, *a)

    monkeypatch.setattr(hooks.cg, "nag", spy)
    return seen


def first_block_image_attention(comfy, model, clip, prompt, name):
    """The image queries' joint-attention output of the first block in the first step of an unpatched
    one-step, cfg-1 sample of ``prompt`` (captured through the host's own dit replace and override)."""
    captured = []
    first = ("double_block", 0)

    def replace(args, extra):
        txt_len = args["txt"].shape[1]

        def override(func, q, k, v, heads, *rest, **kw):
            out = func(q, k, v, heads, *rest, **kw)
            if not captured:
                captured.append(out[:, txt_len:].detach().clone())
            return out

        to = dict(args["transformer_options"], optimized_attention_override=override)
        return extra["original_block"](dict(args, transformer_options=to))

    m = model.clone()
    m.set_model_patch_replace(replace, "dit", *first)
    sample(comfy, m, clip, prompt, name, cfg=1.0, steps=1)
    return captured[0]


def test_z_minus_in_the_first_block_is_the_model_run_on_the_concept(comfy, pack, family, nag_calls):
    nodes, _ = pack
    name, model, clip = family
    guided = guidance_node(nodes, model, clip)
    sample(comfy, guided, clip, PROMPT, name, cfg=1.0, steps=1)
    assert nag_calls, f"concept guidance never guided {name}"
    z_pos, z_neg = nag_calls[0]
    reference = first_block_image_attention(comfy, model, clip, CONCEPT, name)
    assert z_neg.shape == reference.shape == z_pos.shape
    torch.testing.assert_close(z_neg.float(), reference.float(), rtol=1e-4, atol=1e-5)
    own = first_block_image_attention(comfy, model, clip, PROMPT, name)
    torch.testing.assert_close(z_pos.float(), own.float(), rtol=1e-4, atol=1e-5)  # Z⁺: the prompt's own pass
    assert not torch.allclose(z_neg, z_pos), "the concept's branch is the prompt's"


@pytest.mark.parametrize("with_tokens", [False, True], ids=["guidance", "guidance+tokens"])
def test_the_one_pass_path_samples_what_the_two_pass_reference_does(
    comfy, pack, family, nag_calls, with_tokens, monkeypatch
):
    nodes, hooks = pack
    name, model, clip = family
    if name not in TWO_PASS:
        pytest.skip(f"{name} has no two-pass reference path")
    paths = []
    for path in ("inline_guidance", "two_pass_guidance"):
        original = getattr(hooks.DitDispatch, path)
        monkeypatch.setattr(
            hooks.DitDispatch, path, lambda self, *a, _o=original, _p=path: paths.append(_p) or _o(self, *a)
        )
    guided = guidance_node(nodes, model, clip)
    if with_tokens:
        guided = tokens_node(nodes, guided, clip)
    assert hooks.DitDispatch.inline_concept_stream
    inline = sample(comfy, guided, clip, PROMPT, name, cfg=4.0, steps=2)
    inline_calls = list(nag_calls)
    nag_calls.clear()
    try:
        hooks.DitDispatch.inline_concept_stream = False
        reference = sample(comfy, guided, clip, PROMPT, name, cfg=4.0, steps=2)
    finally:
        hooks.DitDispatch.inline_concept_stream = True
    blocks = blocks_of(name, model.model.diffusion_model)
    assert paths == ["inline_guidance"] * (2 * blocks) + ["two_pass_guidance"] * (2 * blocks), paths
    assert len(inline_calls) == len(nag_calls) == 2 * blocks
    for (zp, zn), (rp, rn) in zip(inline_calls, nag_calls):
        torch.testing.assert_close(zn.float(), rn.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(zp.float(), rp.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inline.float(), reference.float(), rtol=1e-4, atol=1e-4)
    unguided = sample(comfy, model, clip, PROMPT, name, cfg=4.0, steps=2)
    assert not torch.allclose(inline, unguided), "the comparison is vacuous: guidance changed nothing"


def test_every_block_guides_the_cond_rows_only(comfy, pack, family, nag_calls):
    nodes, _ = pack
    name, model, clip = family
    guided = guidance_node(nodes, model, clip)
    steps = 2
    sample(comfy, guided, clip, PROMPT, name, cfg=4.0, steps=steps)
    frames = LATENT[name][1] if len(LATENT[name]) == 4 else 1
    dm = model.model.diffusion_model
    patch = int(getattr(dm, "patch_size", None) or dm.params.patch_size)
    queries = frames * (LATENT[name][-2] // patch) * (LATENT[name][-1] // patch)
    blocks = blocks_of(name, dm)
    # one guided call per block per model call; ComfyUI runs cond and uncond in one batch (or two calls):
    # only the cond row is ever guided
    assert len(nag_calls) == blocks * steps, (len(nag_calls), blocks, steps)
    assert all(z.shape[0] == 1 and z.shape[1] == queries and zn.shape == z.shape for z, zn in nag_calls)


def test_strength_zero_is_bit_identical_and_guidance_acts(comfy, pack, family, nag_calls):
    nodes, _ = pack
    name, model, clip = family
    base = sample(comfy, model, clip, PROMPT, name)
    assert torch.equal(sample(comfy, guidance_node(nodes, model, clip, 0.0), clip, PROMPT, name), base)
    assert not nag_calls
    on = sample(comfy, guidance_node(nodes, model, clip), clip, PROMPT, name)
    assert torch.isfinite(on).all() and not torch.equal(on, base), f"concept guidance had no effect on {name}"
    both = sample(comfy, tokens_node(nodes, guidance_node(nodes, model, clip), clip), clip, PROMPT, name)
    assert torch.isfinite(both).all() and not torch.equal(both, on), "token suppression and NAG did not compose"


def test_a_text_attention_mask_stops_before_guiding(comfy, pack, family):
    nodes, _ = pack
    name, model, clip = family
    if name != "qwen_image":
        pytest.skip("Flux-type models take no text mask from the conditioning (Flux.extra_conds: image masks only)")
    import inspect

    import comfy.model_base as mb

    if "attention_mask" not in inspect.getsource(mb.QwenImage.extra_conds):
        pytest.skip("this ComfyUI's Qwen-Image passes no text mask to the model (0.3.x): nothing to refuse")
    guided = guidance_node(nodes, model, clip)
    ((context, extra),) = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    mask = torch.ones(context.shape[:2], dtype=torch.long)
    mask[:, -1] = 0
    positive = [[context, dict(extra, attention_mask=mask)]]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros((1,) + LATENT[name])
    noise = comfy.sample.prepare_noise(latent, 42)
    with pytest.raises(Exception, match="text attention mask"):
        with torch.no_grad():
            comfy.sample.sample(guided, noise, 1, 1.0, "euler", "normal", positive, negative, latent, seed=42)
