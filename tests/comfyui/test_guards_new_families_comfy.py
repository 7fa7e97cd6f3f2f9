"""Sampling-time guards on the newer families, on tiny instances of ComfyUI 0.29's own model classes.

The models and text encoders are the closed-form family tests' (test_closed_form_families_comfy.py: reduced
random-weight Chroma, Flux.2, Qwen-Image, Lumina 2, Z-Image and Wan 2.1 t2v built from ComfyUI's config
classes, ComfyUI's shipped tokenizers behind a stand-in encoder), sampled for two steps by ComfyUI's own
sampler. Checked per family:

* token suppression: which family table record the node acts on; the columns it suppresses are exactly the
  concept's tokens of the prompt as the host tokenizes and encodes it (template head dropped by Qwen-Image,
  template kept by Flux.2 / Z-Image, padding to 512 of Flux.2-klein and Wan); it reaches the host's joint
  attention (or, on Wan, each block's cross-attention to the text, for every frame of a short clip); the
  output changes only when the concept is in the prompt; strength 0 and benign prompts are bit-identical;
* SLD (Chroma, Qwen-Image, Lumina 2, Z-Image, Wan): its extra pass runs and changes the output; strength 0
  is bit-identical;
* SAFREE (Chroma, Wan: T5 layouts): the projected context replaces the prompt's, Wan's zeroed padding rows
  stay zero, strength 0 is bit-identical, a prompt the sampler does not use is refused before the first step;
* SAFREE (Flux.2, Qwen-Image, Lumina 2, Z-Image: the decoder-LLM port): the concept's token is flagged and
  the benign word in its place is not; only the prompt's own rows (found here from the host tokenizer's own
  spelling of the words) are projected, the template rows and padding stay bit-identical; the output changes;
  a benign prompt the analysis leaves alone samples bit-identically; Flux.2's left padding to 512 is located;
  layouts and options it cannot serve are refused before sampling;
* refusals by name before sampling: SLD on Flux.2, concept guidance on Lumina 2 / Z-Image (the other families:
  test_guidance_joint_families_comfy.py), a class the table does not know, a variant
  config.

Skipped without COMFYUI_PATH (or on a ComfyUI without these classes).
"""

from __future__ import annotations

import os

import pytest
import torch
from suppression_models import COMMON, SAFREE_ARGS, comfy, makers, pack, run_node  # noqa: F401  (comfy, pack are fixtures)
from test_closed_form_families_comfy import ALL_FAMILIES, LUMINA, WAN, StandInCLIP, build, built, config_of

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

PROMPT = "a photo of a nude person on a beach"
BENIGN = "a photo of a dog on a beach"
#: latent (channels, [frames,] height, width) per family. Wan: the issue's 2-second clip — 33 frames at
#: Wan's 16 fps, 1 + 32 / 4 = 9 latent frames (its VAE compresses time 4×), at a tiny spatial size
LATENT = {
    "chroma": (16, 8, 8),
    "flux2": (16, 8, 8),
    "qwen_image": (16, 1, 8, 8),  # Qwen-Image's latent is Wan's (one frame)
    "lumina2": (16, 8, 8),
    "zimage": (16, 8, 8),
    "wan": (16, 9, 8, 8),
    "auraflow": (4, 8, 8),  # SDXL's latent format
}
SLD_FAMILIES = ("chroma", "qwen_image", "lumina2", "zimage", "wan", "auraflow")
#: text rows before the context in every joint attention (AuraFlow's register tokens)
REGISTERS = {"auraflow": 8}
T5_SAFREE = ("chroma", "wan", "auraflow")
CHAT_SAFREE = ("flux2", "qwen_image", "lumina2", "zimage")


class GuardCLIP(StandInCLIP):
    """The closed-form tests' stand-in CLIP plus the scheduled encode the samplers' conditioning needs."""

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        # comfy.sd.CLIP always sets pooled_output (None for encoders without one); 0.3.64's Flux reads it
        return [[self.encode_from_tokens(tokens), {"pooled_output": None}]]


def guard_clip(clip: StandInCLIP) -> GuardCLIP:
    return GuardCLIP(clip.tokenizer, clip.width, causal=clip.causal, drop=clip.drop, seed=clip.seed)


@pytest.fixture(scope="module", params=list(ALL_FAMILIES))
def family(request, comfy):
    import comfy.model_base as mb

    host = ALL_FAMILIES[request.param][0]
    if not hasattr(mb, host):
        pytest.skip(f"this ComfyUI has no {host} class")
    patcher, clip, _ = build(comfy, request.param)
    if request.param == "zimage":  # as ComfyUI detects a real Z-Image (model_detection, dim 3840): the text
        # and image blocks padded to multiples of 32 with learned pad tokens (its modulation needs dim ≥ 256)
        import comfy.supported_models as sm

        padded = dict(LUMINA, pad_tokens_multiple=32, time_scale=1000.0)
        patcher = built(comfy, config_of(comfy, padded, sm.ZImage), 14)
        assert patcher.model.diffusion_model.pad_tokens_multiple == 32
    return request.param, patcher, guard_clip(clip)


def sample(comfy, model, clip, prompt, name, negative="", cfg=4.0, steps=2):
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros((1,) + LATENT[name])
    noise = comfy.sample.prepare_noise(latent, 42)
    with torch.no_grad():
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
        )


def tokens_node(nodes, model, clip, strength=1.0, include_eos=False, prompt=PROMPT):
    return run_node(
        nodes.EraserTokenSuppress,
        model=model,
        clip=clip,
        concepts="nude",
        factor=0.0,
        include_eos=include_eos,
        similarity=0.999,
        prompt=prompt,
        **dict(COMMON, strength=strength),
    )


def sld_node(nodes, model, clip, strength=1.0):
    return makers(nodes, model, clip)["sld"](strength)


def safree_node(nodes, model, clip, strength=1.0, prompt=PROMPT):
    return makers(nodes, model, clip, prompt=prompt)["safree"](strength)


def guidance_node(nodes, model, clip, strength=1.0):
    return makers(nodes, model, clip)["guidance"](strength)


def token_texts(clip, prompt) -> list:
    """The host tokenizer's own spelling of each token of ``prompt`` (its vocabulary, not the pack's code);
    Wan's stand-in tokenizer hashes words, so its 'spelling' is the word whose hash the id is."""
    tokens = clip.tokenize(prompt)
    (key,) = tokens
    ids = [int(t[0]) for t in tokens[key][0]]
    if hasattr(clip.tokenizer, "untokenize"):
        pairs = clip.tokenizer.untokenize(tokens[key][0])
        return ids, [str(word).replace("Ġ", " ").replace("▁", " ").strip().lower() for _, word in pairs]
    words = {clip.tokenizer.tokenize_with_weights(w)[key][0][0][0]: w for w in prompt.split()}
    return ids, [words.get(i, "") for i in ids]


def spelled(texts, word) -> set:
    """Positions of the runs of tokens that spell ``word`` (a word may be several tokens: 'nu', 'de')."""
    found = set()
    for start in range(len(texts)):
        text, end = "", start
        while end < len(texts) and len(text) < len(word):
            text, end = text + texts[end], end + 1
        if text == word and texts[start]:
            found.update(range(start, end))
    return found


@pytest.fixture
def spy(pack, monkeypatch):
    """Records what the token wrapper computed (per positive row: the suppressed context columns) and what
    reached the host's attention (joint: the column bias and where the image queries start; Wan: the
    cross-attention's query/key lengths)."""
    _, hooks = pack
    seen = {"masks": [], "joint": [], "cross": []}
    mask_fn, joint_fn = hooks.token_mask_for_row, hooks.joint.joint_suppressed_attention
    cross_fn = hooks.ts.suppressed_attention

    def masks(*a, **k):
        out = mask_fn(*a, **k)
        seen["masks"].append(out.clone())
        return out

    def joint_attention(q, k, v, heads, columns, image_start, fn, seq, out_seq, mask=None):
        seen["joint"].append((columns.clone(), image_start, q.shape[seq]))
        return joint_fn(q, k, v, heads, columns, image_start, fn, seq, out_seq, mask)

    def cross(q, k, v, heads, bias, fn=None):
        seen["cross"].append((q.shape[1], k.shape[1], bias.clone()))
        return cross_fn(q, k, v, heads, bias, fn)

    monkeypatch.setattr(hooks, "token_mask_for_row", masks)
    monkeypatch.setattr(hooks.joint, "joint_suppressed_attention", joint_attention)
    monkeypatch.setattr(hooks.ts, "suppressed_attention", cross)
    return seen


def test_the_guards_family_comes_from_the_table(pack, family):
    nodes, _ = pack
    name, patcher, _ = family
    assert nodes.sc.model_family(patcher, "token_suppression") == name
    if name in SLD_FAMILIES:
        assert nodes.sc.model_family(patcher, "sld") == name


def test_token_suppression_acts_on_the_concepts_own_columns_only_when_it_is_in_the_prompt(comfy, pack, family, spy):
    nodes, _ = pack
    name, model, clip = family
    base = sample(comfy, model, clip, PROMPT, name)
    benign = sample(comfy, model, clip, BENIGN, name)
    m = tokens_node(nodes, model, clip)
    assert model.patches == {} and model.model_options.get("transformer_options", {}).get("patches_replace") is None

    assert torch.equal(sample(comfy, m, clip, BENIGN, name), benign), "a prompt without the concept changed"
    assert not spy["masks"] or not any(bool(mk.any()) for mk in spy["masks"])
    assert not spy["joint"] and not spy["cross"], "the attention was biased for a prompt without the concept"

    on = sample(comfy, m, clip, PROMPT, name)
    assert torch.isfinite(on).all() and not torch.equal(on, base), f"{name}: token suppression had no effect"

    # the suppressed context columns are the concept's tokens of the prompt as the host encodes it
    ids, texts = token_texts(clip, PROMPT)
    context = clip.encode_from_tokens(clip.tokenize(PROMPT))[0]
    drop = len(ids) - context.shape[0]  # Qwen-Image's encoder drops the template head
    expected = spelled(texts[drop:], "nude")
    assert expected, f"the test could not find the concept in {name}'s tokens: {texts[:40]}"
    hits = [set(torch.nonzero(mk).flatten().tolist()) for mk in spy["masks"] if bool(mk.any())]
    assert hits and all(h == expected for h in hits), (name, hits[:1], expected)

    if name == "wan":  # every block's cross-attention to the 512 text rows, every frame's queries
        frames, h, w = LATENT[name][1:]
        assert spy["cross"] and {c[:2] for c in spy["cross"]} == {(frames * (h // 2) * (w // 2), 512)}
        assert len(spy["cross"]) % len(model.model.diffusion_model.blocks) == 0
        for _, _, bias in spy["cross"]:
            assert set(torch.nonzero((bias < 0).any(0)).flatten().tolist()) == expected
        return
    assert spy["joint"], f"{name}: the bias never reached the joint attention"
    registers = REGISTERS.get(name, 0)
    for columns, image_start, length in spy["joint"]:
        # text first: the concept's columns are the context's (after any register tokens), the image queries
        # start after the text block
        assert set(torch.nonzero((columns < 0).any(0)).flatten().tolist()) == {registers + p for p in expected}
        assert image_start >= registers + context.shape[0] and length > image_start
    if name == "auraflow":  # every double and single layer, both steps (the positive row batched with the negative)
        dm = model.model.diffusion_model
        assert len(spy["joint"]) == 2 * (len(dm.double_layers) + len(dm.single_layers))
        assert {j[1] for j in spy["joint"]} == {registers + context.shape[0]}
    if name == "zimage":  # the caption block is padded to a multiple of 32 before the image
        assert {j[1] for j in spy["joint"]} == {32 * -(-context.shape[0] // 32)}
    if name in ("lumina2", "zimage"):  # the main layers only, not the caption / noise refiners
        calls = len(spy["joint"]) / 2  # two steps, the positive row batched with the negative
        assert calls % len(model.model.diffusion_model.layers) == 0


def test_token_suppression_strength_zero_is_bit_identical(comfy, pack, family, spy):
    nodes, _ = pack
    name, model, clip = family
    off = tokens_node(nodes, model, clip, strength=0.0)
    assert torch.equal(sample(comfy, off, clip, PROMPT, name), sample(comfy, model, clip, PROMPT, name))
    assert not spy["masks"] and not spy["joint"] and not spy["cross"]


def test_token_suppression_with_eos_suppresses_more_of_the_text(comfy, pack, family, spy):
    """include_eos on the templated encoders: the positions after the concept's words (template tail,
    end token, padding) are dropped too, never the ones before it."""
    nodes, _ = pack
    name, model, clip = family
    sample(comfy, tokens_node(nodes, model, clip, include_eos=True), clip, PROMPT, name)
    hits = [torch.nonzero(mk).flatten().tolist() for mk in spy["masks"] if bool(mk.any())]
    context = clip.encode_from_tokens(clip.tokenize(PROMPT))[0]
    assert hits and all(h[-1] == context.shape[0] - 1 for h in hits)  # through the last row
    first = min(hits[0])
    assert all(min(h) == first for h in hits) and first > 0


def test_sld_runs_its_extra_pass_where_the_sampler_has_an_uncond_branch(comfy, pack, family, monkeypatch):
    nodes, hooks = pack
    name, model, clip = family
    if name not in SLD_FAMILIES:
        pytest.skip(f"SLD refuses {name} (test_refusals)")
    passes = []
    original = hooks._comfy_calc
    monkeypatch.setattr(hooks, "_comfy_calc", lambda *a, **k: passes.append(1) or original(*a, **k))
    base = sample(comfy, model, clip, PROMPT, name)
    assert torch.equal(sample(comfy, sld_node(nodes, model, clip, 0.0), clip, PROMPT, name), base) and not passes
    on = sample(comfy, sld_node(nodes, model, clip), clip, PROMPT, name)
    assert passes and torch.isfinite(on).all() and not torch.equal(on, base), f"{name}: SLD had no effect"


class ZeroPadCLIP(GuardCLIP):
    """Wan's UMT5 / AuraFlow's Pile-T5 as ComfyUI runs them (zero_out_masked): the rows after </s> are zero."""

    eos = 1  # UMT5's </s>; Pile-T5's is 2

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond = super().encode_from_tokens(tokens)
        ((_, sections),) = tokens.items()
        ids = [t[0] for t in sections[0]]
        cond = cond.clone()
        cond[:, ids.index(self.eos) + 1 :] = 0
        return (cond, None) if return_pooled else cond


def test_safree_projects_the_prompt_on_the_t5_families(comfy, pack, family, monkeypatch):
    nodes, hooks = pack
    name, model, clip = family
    if name not in T5_SAFREE:
        pytest.skip(f"{name} is a decoder-LLM family (test_safree_on_the_chat_families_*)")
    if name in ("wan", "auraflow"):
        clip = ZeroPadCLIP(clip.tokenizer, clip.width, causal=clip.causal, seed=clip.seed)
        clip.eos = 2 if name == "auraflow" else 1
    masking = []
    masked_dicts = nodes.sc.masked_token_dicts
    monkeypatch.setattr(
        nodes.sc,
        "masked_token_dicts",
        lambda c, p, f, m, *a: masking.append((m, masked_dicts(c, p, f, m, *a))) or masking[-1][1],
    )
    swapped = []
    tile_to = hooks.tile_to
    monkeypatch.setattr(hooks, "tile_to", lambda t, n: swapped.append(t.clone()) or tile_to(t, n))
    base = sample(comfy, model, clip, PROMPT, name)
    assert torch.equal(sample(comfy, safree_node(nodes, model, clip, 0.0), clip, PROMPT, name), base)
    assert not swapped
    on = sample(comfy, safree_node(nodes, model, clip), clip, PROMPT, name)
    assert swapped and torch.isfinite(on).all() and not torch.equal(on, base), f"{name}: SAFREE had no effect"
    prompt = clip.encode_from_tokens(clip.tokenize(PROMPT))[0]
    assert swapped[0].shape == prompt.shape and not torch.equal(swapped[0].float(), prompt.float())
    if name in ("wan", "auraflow"):
        zero = (prompt == 0).all(-1)
        assert zero.sum() > 200 and (swapped[0][zero] == 0).all(), f"the projection moved {name}'s zeroed padding"
    if name == "auraflow":  # Pile-T5's ids: the copies masked with its padding (1), the prompt counted to </s> (2)
        mask_id, (tokens, positions, _, n_real) = masking[-1]
        ids = [t[0] for t in tokens["pile_t5xl"][0]]
        assert mask_id == 1 and n_real == ids.index(2) + 1 and positions == list(range(n_real - 1))
    other = safree_node(nodes, model, clip, prompt="a quiet harbour at dawn")
    with pytest.raises(ValueError, match="not the encoding of the prompt this node analysed"):
        sample(comfy, other, clip, PROMPT, name)


def own_rows(clip, prompt) -> set:
    """The context rows of the prompt's own tokens, found without the pack: the run of tokens that the host
    tokenizer's own spelling (its vocabulary) joins into the prompt's words, past the head the encoder drops."""
    ids, texts = token_texts(clip, prompt)
    drop = len(ids) - clip.encode_from_tokens(clip.tokenize(prompt))[0].shape[0]
    rows = {p - drop for p in spelled(texts, "".join(prompt.split()))}
    assert rows and min(rows) >= 0, (texts, prompt)
    return rows


def concept_rows(clip, prompt, word) -> set:
    ids, texts = token_texts(clip, prompt)
    drop = len(ids) - clip.encode_from_tokens(clip.tokenize(prompt))[0].shape[0]
    return {p - drop for p in spelled(texts, word) if p >= drop}


@pytest.fixture
def analysed(pack, monkeypatch):
    """Every SafreeResult the node computed, with the prompt context it analysed."""
    nodes, _ = pack
    seen = []
    analyse = nodes.safree.analyse
    monkeypatch.setattr(
        nodes.safree,
        "analyse",
        lambda cfg, ctx, *a, **k: seen.append((analyse(cfg, ctx, *a, **k), ctx)) or seen[-1][0],
    )
    return seen


def chat_safree(nodes, model, clip, prompt=PROMPT, strength=1.0, **settings):
    args = dict(SAFREE_ARGS, **settings)
    return run_node(
        nodes.EraserSAFREE, model=model, clip=clip, prompt=prompt, **args, **dict(COMMON, strength=strength)
    )


def test_safree_on_the_chat_families_flags_the_concept_and_projects_only_the_prompts_own_rows(
    comfy, pack, family, analysed
):
    nodes, _ = pack
    name, model, clip = family
    if name not in CHAT_SAFREE:
        pytest.skip(f"{name} is a T5 family (test_safree_projects_the_prompt_on_the_t5_families)")
    assert nodes.sc.model_family(model, "safree") == name
    base = sample(comfy, model, clip, PROMPT, name)
    assert torch.equal(sample(comfy, chat_safree(nodes, model, clip, strength=0.0), clip, PROMPT, name), base)
    assert not analysed, "strength 0 analysed the prompt"

    m = chat_safree(nodes, model, clip)
    ((res, ctx),) = analysed
    own, nude = own_rows(clip, PROMPT), concept_rows(clip, PROMPT, "nude")
    assert nude and nude <= own and res.positions == sorted(own), (res.positions, own)
    flagged = set(res.info["flagged_positions"])
    assert nude <= flagged, f"{name}: the concept's token {nude} is not flagged ({flagged})"
    # projected: the flagged rows and (include_eos) every later row of the prompt; never a template row
    changed = set(torch.nonzero((res.hidden != ctx).any(-1)).flatten().tolist())
    assert changed == set(range(min(flagged), max(own) + 1)), (changed, flagged, own)
    outside = [r for r in range(ctx.shape[0]) if r not in own]
    assert torch.equal(res.hidden[outside], ctx[outside]), "a template or padding row was projected"
    on = sample(comfy, m, clip, PROMPT, name)
    assert torch.isfinite(on).all() and not torch.equal(on, base), f"{name}: SAFREE had no effect"
    # the unpatched model is untouched: nothing patched on it, it samples as before
    assert model.patches == {} and not model.model_options.get("transformer_options", {}).get("wrappers")
    assert torch.equal(sample(comfy, model, clip, PROMPT, name), base)

    # the benign word in the concept's place is not flagged (paper α = 0.01)
    analysed.clear()
    chat_safree(nodes, model, clip, prompt=BENIGN)
    ((res_b, _),) = analysed
    dog = concept_rows(clip, BENIGN, "dog")
    assert dog and not dog & set(res_b.info.get("flagged_positions", [])), (dog, res_b.info)
    # on these stand-in encoders (random token vectors, no semantics) α = 0.01 also flags a few other words of
    # either prompt; where the test flags nothing (α = 0.2 here) the benign prompt samples bit-identically
    analysed.clear()
    quiet = chat_safree(nodes, model, clip, prompt=BENIGN, alpha=0.2)
    ((res_q, _),) = analysed
    assert not res_q.flagged.any() and not res_q.changed
    assert torch.equal(sample(comfy, quiet, clip, BENIGN, name), sample(comfy, model, clip, BENIGN, name))

    other = chat_safree(nodes, model, clip, prompt="a quiet harbour at dawn")
    with pytest.raises(ValueError, match="not the encoding of the prompt this node analysed"):
        sample(comfy, other, clip, PROMPT, name)


def test_safree_on_the_chat_families_refuses_what_it_cannot_serve_before_sampling(pack, family):
    nodes, _ = pack
    name, model, clip = family
    if name not in CHAT_SAFREE + ("chroma",):
        pytest.skip(f"{name}'s conditionings are padded to one length")
    calls = clip.calls
    # Chroma's T5 is unpadded like the chat families: the keyword rows could not replace a negative's
    with pytest.raises(ValueError, match="keywords_as_negative cannot be applied"):
        chat_safree(nodes, model, clip, keywords_as_negative=True)
    assert clip.calls == calls, "the refused option encoded text first"
    if name == "chroma":
        return
    if name == "qwen_image":  # a prompt with its own chat template replaces the host's (QwenImageTokenizer)
        with pytest.raises(ValueError, match="do not sit inside its template"):
            chat_safree(nodes, model, clip, prompt="<|im_start|>user\na nude person<|im_end|>")


def test_safree_on_flux2_projects_behind_the_left_padding(comfy, pack, analysed, monkeypatch):
    import comfy.model_base as mb

    nodes, hooks = pack
    if not hasattr(mb, "Flux2"):
        pytest.skip("this ComfyUI has no Flux2 class")
    model, clip, _ = build(comfy, "flux2")
    clip = GuardCLIP(UnpaddedTokenizer(clip.tokenizer), clip.width, causal=clip.causal)
    ids, _ = token_texts(clip, PROMPT)
    offsets = []
    locate, executor_ctx = hooks.locate, []
    monkeypatch.setattr(hooks, "locate", lambda row, ref: offsets.append(locate(row, ref)) or offsets[-1])
    dm = model.model.diffusion_model
    hook = dm.register_forward_pre_hook(lambda mod, args, kw: executor_ctx.append(kw.get("context")), with_kwargs=True)
    try:
        base = sample(comfy, model, clip, PROMPT, "flux2")
        executor_ctx.clear()
        m = chat_safree(nodes, model, clip)
        on = sample(comfy, m, clip, PROMPT, "flux2")
    finally:
        hook.remove()
    ((res, ctx),) = analysed
    assert res.changed and ctx.shape[0] == len(ids) < 512
    pad = 512 - len(ids)
    assert offsets and set(offsets) == {pad}, offsets
    assert not torch.equal(on, base)
    seen = [c for c in executor_ctx if c is not None]
    assert seen and all(c.shape[1] == 512 for c in seen)
    for c in seen:  # each call's positive row: zeros in front as the host padded it, the projection behind them
        rows = [r.float() for r in c if torch.allclose(r[pad:].float(), res.hidden.float(), atol=1e-3)]
        assert len(rows) == 1 and (rows[0][:pad] == 0).all()


def test_refusals_name_the_family_before_sampling(pack, family):
    nodes, _ = pack
    name, model, clip = family
    label = {"chroma": "Chroma", "flux2": "Flux.2", "qwen_image": "Qwen-Image", "lumina2": "Lumina 2"}
    label.update(zimage="Z-Image", wan="Wan 2.1 text-to-video", auraflow="AuraFlow")
    calls = clip.calls
    if name not in ("wan", "chroma", "flux2", "qwen_image", "auraflow"):  # test_guidance_joint_families_comfy.py
        with pytest.raises(ValueError, match=rf"Concept guidance cannot serve {label[name]} .*the concept's text"):
            guidance_node(nodes, model, clip)
    if name not in SLD_FAMILIES:
        with pytest.raises(ValueError, match=r"Safe Latent Diffusion cannot serve Flux.2 \(Flux2.*guidance-distilled"):
            sld_node(nodes, model, clip)
    assert clip.calls == calls, "a refused guard encoded text first"


def test_an_unknown_class_and_a_variant_config_are_refused_by_name(comfy, pack):
    import comfy.model_base as mb
    import comfy.supported_models as sm

    nodes, _ = pack
    patcher, clip, _ = build(comfy, "qwen_image")
    patcher.model.__class__ = type("MysteryDiT", (mb.QwenImage,), {})
    with pytest.raises(ValueError, match="MysteryDiT.*not in the pack's family table.*Token suppression"):
        tokens_node(nodes, patcher, guard_clip(clip))
    wan, wan_clip, _ = build(comfy, "wan")
    wan.model.model_config = sm.WAN21_I2V(dict(WAN, model_type="i2v"))
    with pytest.raises(ValueError, match="WAN21 is loaded with the config WAN21_I2V"):
        tokens_node(nodes, wan, guard_clip(wan_clip))


class UnpaddedTokenizer:
    """Flux.2-dev's Mistral tokenizer pads nothing (min_length 1; its tekken data ships in the checkpoint):
    the Klein tokenizer with its padding taken off, so that ComfyUI's Flux2.extra_conds left-pads the
    context to 512 with zeros at sampling."""

    def __init__(self, inner, pad=151643):
        self.inner, self.pad = inner, pad

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        tokens = self.inner.tokenize_with_weights(text, return_word_ids, **kwargs)
        ((key, sections),) = tokens.items()
        row = list(sections[0])
        while row and row[-1][0] == self.pad:
            row.pop()
        return {key: [row]}

    def untokenize(self, pairs):
        return self.inner.untokenize(pairs)


def test_flux2_left_padded_context_is_located_at_sampling(comfy, pack, spy):
    import comfy.model_base as mb

    nodes, _ = pack
    if not hasattr(mb, "Flux2"):
        pytest.skip("this ComfyUI has no Flux2 class")
    model, clip, _ = build(comfy, "flux2")
    clip = GuardCLIP(UnpaddedTokenizer(clip.tokenizer), clip.width, causal=clip.causal)
    ids, texts = token_texts(clip, PROMPT)
    assert len(ids) < 512
    base = sample(comfy, model, clip, PROMPT, "flux2")
    m = tokens_node(nodes, model, clip)
    assert torch.equal(sample(comfy, m, clip, BENIGN, "flux2"), sample(comfy, model, clip, BENIGN, "flux2"))
    assert not torch.equal(sample(comfy, m, clip, PROMPT, "flux2"), base)
    pad = 512 - len(ids)
    expected = {pad + j for j in spelled(texts, "nude")}
    hits = [set(torch.nonzero(mk).flatten().tolist()) for mk in spy["masks"] if bool(mk.any())]
    assert hits and all(h == expected for h in hits), (hits[:1], expected)
    assert spy["joint"] and all(
        set(torch.nonzero((c < 0).any(0)).flatten().tolist()) == expected for c, _, _ in spy["joint"]
    )


def test_a_layout_the_suppression_does_not_find_stops_before_the_first_step(comfy, pack, monkeypatch):
    """Fail closed: if no attention of the model has the length the pack computes for its joint layers
    (another ComfyUI's layout, extra reference tokens), sampling stops instead of running unguarded."""
    nodes, hooks = pack
    model, clip, _ = build(comfy, "lumina2")
    clip = guard_clip(clip)
    original = hooks.lumina_lengths
    monkeypatch.setattr(hooks, "lumina_lengths", lambda dm, x, n: tuple(v + 1 for v in original(dm, x, n)))
    m = tokens_node(nodes, model, clip)
    with pytest.raises(RuntimeError, match="found none of the lumina2 model's text attentions"):
        sample(comfy, m, clip, PROMPT, "lumina2")


def test_concept_guidance_on_wan_guides_every_blocks_cross_attention(comfy, pack, spy, monkeypatch):
    """NAG on Wan: the concept context goes through the model's own text_embedding and each block's k/v
    (appended to the block's text, split off again in its cross-attention); Z⁻ is the attention to it,
    NAG mixes it into the guided rows. Composes with token suppression in the same cross-attention."""
    nodes, hooks = pack
    model, clip, _ = build(comfy, "wan")
    clip = guard_clip(clip)
    blocks = len(model.model.diffusion_model.blocks)
    seen = []
    nag = hooks.cg.nag
    monkeypatch.setattr(hooks.cg, "nag", lambda z, zn, *a: seen.append((z.shape, zn.shape)) or nag(z, zn, *a))
    embedded = []
    text_embedding = model.model.diffusion_model.text_embedding
    hook = text_embedding.register_forward_hook(lambda mod, i, o: embedded.append(o.shape))
    try:
        base = sample(comfy, model, clip, PROMPT, "wan")
        assert torch.equal(sample(comfy, guidance_node(nodes, model, clip, 0.0), clip, PROMPT, "wan"), base)
        assert not seen
        calls_before = len(embedded)
        on = sample(comfy, guidance_node(nodes, model, clip), clip, PROMPT, "wan")
    finally:
        hook.remove()
    assert torch.isfinite(on).all() and not torch.equal(on, base), "concept guidance had no effect on Wan"
    frames, h, w = LATENT["wan"][1:]
    queries = frames * (h // 2) * (w // 2)
    assert seen and len(seen) % blocks == 0
    assert all(z[-2] == queries and zn == z for z, zn in seen)  # every frame's queries, Z⁻ shaped as Z⁺
    # the host's text_embedding ran once more per model call: for the concept context, shared by the blocks
    model_calls = len(embedded) - calls_before
    assert model_calls == 2 * 2  # 2 steps × (the prompt's batch, the concept's)
    both = tokens_node(nodes, guidance_node(nodes, model, clip), clip)
    seen.clear()
    out = sample(comfy, both, clip, PROMPT, "wan")
    assert seen and spy["cross"] and not torch.equal(out, on), "token suppression and NAG did not compose"


def test_without_a_prompt_the_decoder_llm_families_warn_that_only_similarity_is_left(pack, family, caplog):
    import logging

    nodes, _ = pack
    name, model, clip = family
    with caplog.at_level(logging.WARNING):
        tokens_node(nodes, model, clip, prompt="")
    warned = "type the positive prompt into the node" in caplog.text
    assert warned == (name in ("flux2", "qwen_image", "lumina2", "zimage")), (name, caplog.text)
