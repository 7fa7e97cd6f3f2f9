"""HiDream-I1's closed form on a tiny instance of ComfyUI 0.29's own ``HiDream`` class.

The model: ComfyUI's HiDream config class on a reduced unet config (2 double + 2 single blocks, Llama layers
[0, 1, 3, 3] so two blocks share a stream, small caption widths), random weights. The text encoder: a
stand-in with HiDream's four tokenizer keys and output layout — T5 rows as the context, every "Llama
layer" stacked as ``conditioning_llama3`` with the start token's row dropped, pooled CLIP-L ⊕ CLIP-G —
over ComfyUI's shipped CLIP-L / CLIP-G / T5 tokenizers; the snapshot ships no Llama-3 tokenizer.json, so
its Llama tokenizer is a word-hash stand-in with the real special tokens (start 128000, pad 128009, 128
positions, no end token).

Checked: each caption projection is edited with the keys of the stream it reads (UCE's equations per
projection, through the host's own Linear, with the key rows found independently from the token ids);
the pooled embedder too; projections sharing a Llama layer are solved in one stream; strength 0 patches nothing; the
other closed forms run; save → load → apply reproduces the patches; the model samples; a non-HiDream
CLIP and a HiDream variant with another projection count are refused by name before encoding.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from test_closed_form_families_comfy import LAM, PREFIX, built, config_of, host_output, pack  # noqa: F401

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

T5_WIDTH, LLAMA_WIDTH, LLAMA_DEPTH = 40, 48, 4
LLAMA_LAYERS = [0, 1, 3, 3]
HIDREAM = {
    "image_model": "hidream",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "caption_channels": [T5_WIDTH, LLAMA_WIDTH],
    "text_emb_dim": 2048,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [8, 4, 4],
    "max_resolution": [16, 16],
    "llama_layers": LLAMA_LAYERS,
}
PROJECTIONS = [f"caption_projection.{i}.linear.weight" for i in range(len(LLAMA_LAYERS) + 1)]
POOLED = "p_embedder.pooled_embedder.linear_1.weight"


class LlamaWords:
    """Llama 3's layout without its tokenizer.json: start token, one id per word, padded to 128, no end."""

    start_token, pad_token, min_length = 128000, 128009, 128

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        ids = [self.start_token] + [1000 + int(hashlib.md5(w.encode()).hexdigest(), 16) % 100000 for w in text.split()]
        ids += [self.pad_token] * (self.min_length - len(ids))
        return [[(i, 1.0) for i in ids]]


class HiDreamStandInCLIP:
    """comfy.sd.CLIP's API with HiDream's output layout (HiDreamTEModel.encode_token_weights)."""

    def __init__(self, seed=0):
        from comfy.text_encoders.hidream import HiDreamTokenizer

        self.tokenizer = HiDreamTokenizer()
        self.tokenizer.llama = LlamaWords()
        self.cond_stage_model = type("StandInHiDreamTE", (), {})()
        self.seed, self.calls = seed, 0

    def tokenize(self, text, return_word_ids=False, **kwargs):
        out = self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)
        out["llama"] = self.tokenizer.llama.tokenize_with_weights(text)
        return out

    def rows(self, ids, width, salt):
        gen = lambda t: torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 7919 + int(t))  # noqa: E731
        return torch.stack([torch.randn(width, generator=gen(t)) for t in ids])

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls += 1
        t5_ids = [t[0] for t in tokens["t5xxl"][0]]
        x = self.rows(t5_ids, T5_WIDTH, 1)
        t5 = torch.tanh(x + x.mean(0, keepdim=True))[None]  # bidirectional: padding changes every row
        llama_ids = [t[0] for t in tokens["llama"][0]]
        layers = []
        for layer in range(LLAMA_DEPTH):
            x = self.rows(llama_ids, LLAMA_WIDTH, 10 + layer)
            layers.append(torch.tanh(x.cumsum(0) / torch.arange(1, len(llama_ids) + 1)[:, None]))
        llama = torch.stack(layers)[None][:, :, 1:]  # the host drops the start token's row
        pooled = self.rows([t[0] for t in tokens["l"][0]], 2048, 2).mean(0, keepdim=True)
        if return_dict:
            return {"cond": t5, "pooled_output": pooled, "conditioning_llama3": llama}
        return (t5, pooled) if return_pooled else t5

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        return [[cond, out]]


@pytest.fixture(scope="module")
def hidream(comfy):
    import comfy.model_base as mb
    import comfy.supported_models as sm

    if not hasattr(mb, "HiDream"):
        pytest.skip("this ComfyUI has no HiDream class")
    patcher = built(comfy, config_of(comfy, HIDREAM, sm.HiDream), 21)
    assert type(patcher.model).__name__ == "HiDream"
    return patcher, HiDreamStandInCLIP()


def key_rows(clip, prompt):
    """(T5 row, {Llama layer: row}, pooled) of the prompt's last word, found from the token ids alone."""
    tokens = clip.tokenize(prompt)
    out = clip.encode_from_tokens(tokens, return_dict=True)
    t5_ids = [t[0] for t in tokens["t5xxl"][0]]
    t5_row = out["cond"][0, t5_ids.index(1) - 1]  # the word before </s>
    n_words = len(prompt.split())
    llama = {layer: out["conditioning_llama3"][0, layer, n_words - 1] for layer in range(LLAMA_DEPTH)}
    return t5_row, llama, out["pooled_output"][0]


def projection(dm, key):
    if key == POOLED:
        return dm.p_embedder.pooled_embedder.linear_1
    return dm.caption_projection[int(key.split(".")[1])].linear


def test_uce_edits_every_projection_with_its_own_streams_keys(comfy, pack, hidream):
    nodes, adapters = pack
    patcher, clip = hidream
    assert adapters.model_family(patcher).value == "hidream"
    erased, eraser = nodes.EraserClosedForm.execute(
        patcher, clip, "uce", "Van Gogh", "a painter", "a photo of a cat", 1.0, params=f"lam={LAM}"
    ).args
    assert sorted(eraser.keys()) == sorted(PROJECTIONS + [POOLED]) and eraser.family.value == "hidream"
    assert eraser.timings["streams"] == 1 + len(set(LLAMA_LAYERS))  # T5 (+ pooled) and Llama 0, 1, 3
    assert patcher.patches == {}, "the node patched its input model"
    c, c_star, p = (key_rows(clip, t) for t in ("Van Gogh", "a painter", "a photo of a cat"))
    for key in eraser.keys():
        if key == POOLED:
            pick = lambda rows: rows[2]  # noqa: E731
        elif key == PROJECTIONS[-1]:
            pick = lambda rows: rows[0]  # noqa: E731
        else:
            layer = LLAMA_LAYERS[int(key.split(".")[1])]
            pick = lambda rows, j=layer: rows[1][j]  # noqa: E731
        before = host_output(comfy, patcher, projection, key, torch.stack([pick(c), pick(c_star), pick(p)]))
        after = host_output(comfy, erased, projection, key, torch.stack([pick(c), pick(p)]))
        moved = (before[0] - before[1]).norm()
        assert moved > 0
        assert (after[0] - before[1]).norm() < 0.02 * moved, f"{key}: the concept did not map to the anchor"
        assert (after[1] - before[2]).norm() < 0.02 * moved, f"{key}: the preserved prompt moved"


def test_strength_zero_patches_nothing_and_the_other_methods_run(comfy, pack, hidream):
    nodes, _ = pack
    patcher, clip = hidream
    same, eraser = nodes.EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "", 0.0).args
    assert same.patches == {} and len(eraser.keys()) == len(PROJECTIONS) + 1
    c = key_rows(clip, "Van Gogh")[1][0][None]
    for method in ("rece", "speed", "mace"):
        erased, eraser = nodes.EraserClosedForm.execute(patcher, clip, method, "Van Gogh", "", "a photo", 1.0).args
        assert eraser.keys() and set(eraser.keys()) <= set(PROJECTIONS + [POOLED]), method
        key = PROJECTIONS[0]
        moved = host_output(comfy, erased, projection, key, c) - host_output(comfy, patcher, projection, key, c)
        assert moved.abs().max() > 0, f"{method} did not move the concept at {key}"


def test_save_load_apply_and_sample(comfy, pack, hidream, tmp_path, monkeypatch):
    import importlib

    nodes, _ = pack
    patcher, clip = hidream
    erased, eraser = nodes.EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "", 1.0).args
    files = importlib.import_module(nodes.__name__.rsplit(".", 2)[0] + ".erasers.files.eraser_file")
    path = tmp_path / "hidream_van_gogh.safetensors"
    files.save_eraser(eraser, str(path))
    loaded = files.load_eraser(str(path))
    assert loaded.family.value == "hidream" and sorted(loaded.keys()) == sorted(eraser.keys())
    adapters = importlib.import_module(nodes.__name__.rsplit(".", 1)[0] + ".adapters")
    again = adapters.apply_eraser(patcher, loaded, 1.0)
    assert sorted(again.patches) == sorted(erased.patches)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a painting by Van Gogh"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros((1, 16, 8, 8))
    noise = comfy.sample.prepare_noise(latent, 42)
    with torch.no_grad():
        base = comfy.sample.sample(
            patcher, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
        )
        out = comfy.sample.sample(
            again, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
        )
    assert torch.isfinite(out).all() and not torch.equal(out, base), "the HiDream eraser had no effect on sampling"


def test_a_clip_that_is_not_hidreams_and_a_variant_are_refused_by_name(comfy, pack, hidream):
    from test_closed_form_families_comfy import StandInCLIP, WordTokenizer

    nodes, _ = pack
    patcher, clip = hidream
    wrong = StandInCLIP(WordTokenizer(), T5_WIDTH, causal=False)
    with pytest.raises(ValueError, match="HiDream-I1.*CLIP-L, CLIP-G, T5-XXL and Llama"):
        nodes.EraserClosedForm.execute(patcher, wrong, "uce", "Van Gogh", "", "", 1.0)
    assert wrong.calls == 0
    calls = clip.calls
    variant = dict(HIDREAM, llama_layers=LLAMA_LAYERS[:-1] + [3, 3])  # one Llama-fed projection more
    import comfy.supported_models as sm

    other = built(comfy, config_of(comfy, dict(variant, num_single_layers=3), sm.HiDream), 22)
    other.model.diffusion_model.llama_layers = LLAMA_LAYERS  # says 4, has 5 Llama-fed projections
    with pytest.raises(ValueError, match="HiDream-I1 has one caption projection per block"):
        nodes.EraserClosedForm.execute(other, clip, "uce", "Van Gogh", "", "", 1.0)
    assert clip.calls == calls, "a refused model's concepts were encoded"


@pytest.fixture(scope="module")
def guard_nodes(comfy):
    """(nodes.suppression, nodes.suppression_hooks) of the pack imported as the suppression tests import it."""
    from suppression_models import import_guard_pack

    return import_guard_pack()


def test_sld_runs_its_extra_pass_on_hidream(comfy, guard_nodes, hidream, monkeypatch):
    """SLD's safety pass is the host's own conditioning of the safety concept (T5 context, per-layer Llama
    states, pooled) through the model: it runs each step, changes the output, strength 0 is bit-identical
    (SAFREE, token suppression and concept guidance: below)."""
    from suppression_models import makers

    nodes, hooks = guard_nodes
    patcher, clip = hidream
    calls = []
    calc = hooks._comfy_calc
    monkeypatch.setattr(hooks, "_comfy_calc", lambda *a, **k: calls.append(1) or calc(*a, **k))

    def run(model):
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a nude person"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros((1, 16, 8, 8))
        noise = comfy.sample.prepare_noise(latent, 42)
        with torch.no_grad():
            return comfy.sample.sample(
                model, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
            )

    make = makers(nodes, patcher, clip)
    base = run(patcher)
    assert torch.equal(run(make["sld"](0.0)), base) and not calls
    on = run(make["sld"](1.0))
    assert calls and torch.isfinite(on).all() and not torch.equal(on, base), "SLD did not act on HiDream"


# -- token suppression: the concept's T5 rows and Llama rows, for the image queries of every block ------------

NUDE, BENIGN_PROMPT = "a photo of a nude person", "a photo of a dog"
LATENT_HW = (8, 8)  # 4 × 4 patches of 2


def hidream_sample(comfy, model, clip, prompt, cfg=4.0, steps=2):
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros((1, 16) + LATENT_HW)
    noise = comfy.sample.prepare_noise(latent, 42)
    with torch.no_grad():
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
        )


def hidream_tokens(nodes, model, clip, strength=1.0, include_eos=False, prompt=NUDE):
    from suppression_models import COMMON, run_node

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


@pytest.fixture
def joint_calls(guard_nodes, monkeypatch):
    """What reached the host's attention: (columns, image_start, image_end, length) per biased call."""
    _, hooks = guard_nodes
    seen, original = [], hooks.joint.joint_suppressed_attention

    def spy(q, k, v, heads, columns, image_start, fn, seq, out_seq, mask=None, image_end=None):
        seen.append((columns.clone(), image_start, image_end, q.shape[seq]))
        return original(q, k, v, heads, columns, image_start, fn, seq, out_seq, mask, image_end=image_end)

    monkeypatch.setattr(hooks.joint, "joint_suppressed_attention", spy)
    return seen


def expected_columns(clip, prompt, word, image_len):
    """The joint columns of ``word``, found from the token ids alone: its T5 positions (no start token) and
    its Llama rows (the word-id stand-in: one id per word, the start token's row dropped) in both Llama blocks."""
    tokens = clip.tokenize(prompt)
    t5 = [t[0] for t in tokens["t5xxl"][0]]
    t5_word = [t[0] for t in clip.tokenize(word)["t5xxl"][0]]
    t5_word = t5_word[: t5_word.index(1)]
    t5_hits = {p + j for p in range(len(t5)) if t5[p : p + len(t5_word)] == t5_word for j in range(len(t5_word))}
    llama_rows = len(tokens["llama"][0]) - 1
    row = prompt.split().index(word)
    t5_len = len(t5)
    columns = {image_len + p for p in t5_hits}
    columns |= {image_len + t5_len + row, image_len + t5_len + llama_rows + row}
    return columns, image_len + t5_len + 2 * llama_rows


def test_token_suppression_on_hidream_biases_the_concepts_t5_and_llama_columns_in_every_block(
    comfy, guard_nodes, hidream, joint_calls
):
    nodes, _ = guard_nodes
    patcher, clip = hidream
    assert nodes.sc.model_family(patcher, "token_suppression") == "hidream"
    base, benign = hidream_sample(comfy, patcher, clip, NUDE), hidream_sample(comfy, patcher, clip, BENIGN_PROMPT)
    m = hidream_tokens(nodes, patcher, clip)
    assert patcher.model_options.get("transformer_options", {}).get("optimized_attention_override") is None

    assert torch.equal(hidream_sample(comfy, m, clip, BENIGN_PROMPT), benign), "a prompt without the concept changed"
    assert not joint_calls, "the attention was biased for a prompt without the concept"

    on = hidream_sample(comfy, m, clip, NUDE)
    assert torch.isfinite(on).all() and not torch.equal(on, base), "token suppression had no effect on HiDream"
    image_len = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    columns, length = expected_columns(clip, NUDE, "nude", image_len)
    dm = patcher.model.diffusion_model
    blocks = len(dm.double_stream_blocks) + len(dm.single_stream_blocks)
    assert len(joint_calls) == 2 * blocks, (len(joint_calls), blocks)  # every block, each of the 2 steps
    for bias, image_start, image_end, seen_length in joint_calls:
        assert (image_start, image_end, seen_length) == (0, image_len, length)
        # the positive row only (cfg 4: cond and uncond in one batch)
        assert [bool((row < 0).any()) for row in bias].count(True) == 1
        assert set(torch.nonzero((bias < 0).any(0)).flatten().tolist()) == columns


def test_token_suppression_on_hidream_strength_zero_and_eos(comfy, guard_nodes, hidream, joint_calls):
    nodes, _ = guard_nodes
    patcher, clip = hidream
    off = hidream_tokens(nodes, patcher, clip, strength=0.0)
    assert torch.equal(hidream_sample(comfy, off, clip, NUDE), hidream_sample(comfy, patcher, clip, NUDE))
    assert not joint_calls
    hidream_sample(comfy, hidream_tokens(nodes, patcher, clip, include_eos=True), clip, NUDE)
    image_len = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
    columns, length = expected_columns(clip, NUDE, "nude", image_len)
    t5_len = len(clip.tokenize(NUDE)["t5xxl"][0])
    llama_rows = (length - image_len - t5_len) // 2
    words = len(NUDE.split())
    # EOS on: T5 from </s> to the end, Llama from the first padding row to the end, in both Llama blocks
    t5_ids = [t[0] for t in clip.tokenize(NUDE)["t5xxl"][0]]
    eos = set(range(image_len + t5_ids.index(1), image_len + t5_len))
    llama = image_len + t5_len
    eos |= set(range(llama + words, llama + llama_rows)) | set(range(llama + llama_rows + words, length))
    for bias, *_ in joint_calls:
        assert set(torch.nonzero((bias < 0).any(0)).flatten().tolist()) == columns | eos


def test_token_suppression_on_hidream_stops_when_no_attention_has_its_layout(comfy, guard_nodes, hidream, monkeypatch):
    nodes, hooks = guard_nodes
    patcher, clip = hidream
    init = hooks.ImageFirstJoint.__init__
    # a ComfyUI that lays HiDream's tokens out otherwise: the layout the override expects is never seen
    monkeypatch.setattr(hooks.ImageFirstJoint, "__init__", lambda self, n, *a, **k: init(self, n + 1, *a, **k))
    with pytest.raises(Exception, match="found none of HiDream-I1's joint attentions"):
        hidream_sample(comfy, hidream_tokens(nodes, patcher, clip), clip, NUDE)


# -- concept guidance: the concept's text rows ride after the prompt's through the model's own streams -------


def hidream_guidance(nodes, model, clip, strength=1.0, alpha=0.25, concepts="nude"):
    from suppression_models import COMMON, run_node

    return run_node(
        nodes.EraserConceptGuidance,
        model=model,
        clip=clip,
        concepts=concepts,
        phi=5.0,
        tau=2.5,
        alpha=alpha,
        sigma_end=0.0,
        **dict(COMMON, strength=strength),
    )


def test_concept_guidance_on_hidream_guides_and_strength_zero_is_bit_identical(comfy, guard_nodes, hidream):
    nodes, hooks = guard_nodes
    patcher, clip = hidream
    assert nodes.sc.model_family(patcher, "concept_guidance") == "hidream"
    base = hidream_sample(comfy, patcher, clip, NUDE)
    assert torch.equal(hidream_sample(comfy, hidream_guidance(nodes, patcher, clip, strength=0.0), clip, NUDE), base)
    m = hidream_guidance(nodes, patcher, clip)
    assert patcher.model_options.get("transformer_options", {}).get("optimized_attention_override") is None
    calls, original = [], hooks.ImageFirstJoint.guided

    def spy(self, *a, **k):
        calls.append(self.length)
        return original(self, *a, **k)

    hooks.ImageFirstJoint.guided = spy
    try:
        on = hidream_sample(comfy, m, clip, NUDE)
    finally:
        hooks.ImageFirstJoint.guided = original
    assert torch.isfinite(on).all() and not torch.equal(on, base), "concept guidance had no effect on HiDream"
    dm = patcher.model.diffusion_model
    assert len(calls) == 2 * (len(dm.double_stream_blocks) + len(dm.single_stream_blocks))  # every block, 2 steps
    # composes with token suppression: one override, both acting
    both = hidream_sample(comfy, hidream_tokens(nodes, m, clip), clip, NUDE)
    assert torch.isfinite(both).all() and not torch.equal(both, on)


def test_concept_guidance_on_hidream_with_alpha_zero_samples_what_the_model_does(comfy, guard_nodes, hidream):
    """α = 0 makes NAG return Z⁺: the concept's rows still ride through every block, so the sample equals the
    unpatched model's (to float rounding: Z⁺ is computed by the log-sum-exp merge) only if the prompt's text
    stream and the image stream never see them and they are cut before the output."""
    nodes, _ = guard_nodes
    patcher, clip = hidream
    base = hidream_sample(comfy, patcher, clip, NUDE)
    m = hidream_guidance(nodes, patcher, clip, alpha=0.0)
    torch.testing.assert_close(hidream_sample(comfy, m, clip, NUDE), base, rtol=1e-4, atol=1e-4)


def test_concept_guidance_on_hidreams_negative_branch_is_the_model_with_the_concept_as_its_text(
    comfy, guard_nodes, hidream, monkeypatch
):
    """Z⁻ of the first block at the first step equals that block's image attention in an unpatched call whose
    T5 context and Llama states are the concept's (the pooled vector stays the prompt's: NAG guides the
    attention, the modulation is the step's own) — the concept's rows reach the joint attention exactly as the
    host's own conditioning would put them there."""
    nodes, hooks = guard_nodes
    patcher, clip = hidream
    negatives, original = [], hooks.cg.nag
    monkeypatch.setattr(hooks.cg, "nag", lambda zp, zn, *a: negatives.append(zn.clone()) or original(zp, zn, *a))
    hidream_sample(comfy, hidream_guidance(nodes, patcher, clip), clip, NUDE, cfg=1.0, steps=1)
    z_neg = negatives[0]  # double block 0, the only row (cfg 1)

    prompt = clip.encode_from_tokens(clip.tokenize(NUDE), return_dict=True)
    concept = clip.encode_from_tokens(clip.tokenize("nude"), return_dict=True)
    extra = {"pooled_output": prompt["pooled_output"], "conditioning_llama3": concept["conditioning_llama3"]}
    cond = [[concept["cond"], extra]]
    seen = []

    def capture(func, q, k, v, heads, *rest, **kw):
        out = func(q, k, v, heads, *rest, **kw)
        seen.append(out)
        return out

    ref = patcher.clone()
    ref.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = capture
    latent = torch.zeros((1, 16) + LATENT_HW)
    noise = comfy.sample.prepare_noise(latent, 42)
    with torch.no_grad():
        comfy.sample.sample(ref, noise, 1, 1.0, "euler", "normal", cond, cond, latent, seed=42, disable_pbar=True)
    image_len = z_neg.shape[1]
    torch.testing.assert_close(z_neg, seen[0][:, :image_len].float(), rtol=1e-4, atol=1e-5)


# -- SAFREE: one projection per text stream (T5 and each Llama layer the blocks read) ----------------------


def hidream_safree(nodes, model, clip, prompt=NUDE, strength=1.0, concepts="nude"):
    from suppression_models import COMMON, SAFREE_ARGS, run_node

    args = dict(SAFREE_ARGS, concepts=concepts)
    return run_node(
        nodes.EraserSAFREE, model=model, clip=clip, prompt=prompt, **args, **dict(COMMON, strength=strength)
    )


@pytest.fixture
def safree_seen(guard_nodes, monkeypatch):
    """The analyses the node handed its wrapper, and what the model received per call (T5 context, Llama)."""
    _, hooks = guard_nodes
    made, calls, original = {}, [], hooks.make_hidream_safree_wrapper

    def spy(t5_result, t5_window, llama_results, llama_windows, prompt_ref, llama_ref):
        made.update(t5=t5_result, llama=llama_results, prompt=prompt_ref, llama_ref=llama_ref)
        inner = original(t5_result, t5_window, llama_results, llama_windows, prompt_ref, llama_ref)

        def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
            def record(x_, t_, cc, ctx, ctl, to, **kw_):
                calls.append((ctx.clone(), kw_["encoder_hidden_states_llama3"].clone(), to.get("cond_or_uncond")))
                return executor(x_, t_, cc, ctx, ctl, to, **kw_)

            return inner(record, x, t, c_concat, c_crossattn, control, transformer_options, **kw)

        return wrapper

    monkeypatch.setattr(hooks, "make_hidream_safree_wrapper", spy)
    return made, calls


def test_safree_on_hidream_projects_each_stream_in_its_own_space_for_the_positive_row(
    comfy, guard_nodes, hidream, safree_seen
):
    nodes, _ = guard_nodes
    patcher, clip = hidream
    made, calls = safree_seen
    assert nodes.sc.model_family(patcher, "safree") == "hidream"
    base = hidream_sample(comfy, patcher, clip, NUDE)
    before = clip.calls
    m = hidream_safree(nodes, patcher, clip)
    assert made, "SAFREE flagged nothing in 'a photo of a nude person' (the test's premise)"
    # one encode per masked position serves both streams' tests (HiDream's four encoders run independently)
    n_t5, n_llama = len(made["t5"].positions), len(next(iter(made["llama"].values())).positions)
    assert clip.calls - before <= 4 + max(n_t5, n_llama) < n_t5 + n_llama, (clip.calls - before, n_t5, n_llama)
    t5, llama = made["t5"], made["llama"]
    assert sorted(llama) == sorted(set(LLAMA_LAYERS)), "one analysis per Llama layer the blocks read"
    changed = [layer for layer, r in llama.items() if r.changed]
    assert t5.changed and changed, (t5.flagged, {k: r.flagged for k, r in llama.items()})
    nude_t5 = [t[0] for t in clip.tokenize(NUDE)["t5xxl"][0]].index(
        [t[0] for t in clip.tokenize("nude")["t5xxl"][0]][0]
    )
    flagged_t5 = [t5.positions[i] for i in torch.nonzero(t5.flagged).flatten().tolist()]
    assert nude_t5 in flagged_t5, flagged_t5  # the concept's T5 token is flagged
    # each Llama layer in its own space: the concept alone ("nude": one own row, the start row dropped) spans
    # that layer's subspace; the projected rows — from the first flagged one to the prompt's last own row
    # (include_eos: a causal decoder carries a word forward) — have no component along it, the others are kept
    concept_rows = clip.encode_from_tokens(clip.tokenize("nude"), return_dict=True)["conditioning_llama3"][0]
    own = len(NUDE.split())
    for layer in changed:
        r, ref = llama[layer], made["llama_ref"][layer]
        first = min(r.positions[i] for i in torch.nonzero(r.flagged).flatten().tolist())
        c = concept_rows[layer, 0].double()
        assert torch.equal(r.hidden[:first], ref[:first]) and torch.equal(r.hidden[own:], ref[own:]), layer
        for row in range(first, own):
            projected = r.hidden[row].double()
            assert not torch.equal(r.hidden[row], ref[row])
            assert abs(float(projected @ c)) < 1e-4 * float(projected.norm() * c.norm()), (layer, row)
    on = hidream_sample(comfy, m, clip, NUDE)
    assert torch.isfinite(on).all() and not torch.equal(on, base), "SAFREE had no effect on HiDream"
    assert calls, "the wrapper never reached the model"
    for ctx, states, chunks in calls:
        cond = chunks.index(0)  # cfg 4: one positive row, one negative
        torch.testing.assert_close(ctx[cond], t5.hidden.to(ctx.dtype))
        for layer in range(states.shape[1]):
            expected = llama[layer].hidden if layer in changed else made["llama_ref"][layer]
            torch.testing.assert_close(states[cond, layer], expected.to(states.dtype), rtol=1e-3, atol=1e-3)
        other = 1 - cond
        assert not torch.allclose(ctx[other], t5.hidden.to(ctx.dtype)), "the negative row was projected"


def test_safree_on_hidream_strength_zero_an_unflagged_prompt_and_another_prompt(
    comfy, guard_nodes, hidream, safree_seen
):
    nodes, _ = guard_nodes
    patcher, clip = hidream
    made, _ = safree_seen
    base = hidream_sample(comfy, patcher, clip, NUDE)
    assert torch.equal(hidream_sample(comfy, hidream_safree(nodes, patcher, clip, strength=0.0), clip, NUDE), base)
    # on this stand-in encoder (random token vectors, no semantics) the paper's α = 0.01 flags a word of any
    # prompt (its test is relative); where nothing is flagged (α = 1 here) the prompt samples bit-identically
    from suppression_models import COMMON, SAFREE_ARGS, run_node

    quiet = run_node(
        nodes.EraserSAFREE, model=patcher, clip=clip, prompt=BENIGN_PROMPT, **dict(SAFREE_ARGS, alpha=1.0), **COMMON
    )
    assert not made, "α = 1 still flagged a token"
    assert torch.equal(
        hidream_sample(comfy, quiet, clip, BENIGN_PROMPT), hidream_sample(comfy, patcher, clip, BENIGN_PROMPT)
    )
    # a sampler whose positive prompt is not the analysed one is refused before sampling
    other = hidream_safree(nodes, patcher, clip, prompt="a quiet harbour at dawn")
    with pytest.raises(ValueError, match="not the encoding of the prompt this node analysed"):
        hidream_sample(comfy, other, clip, NUDE)


@pytest.fixture(scope="module")
def lora_pack(comfy):
    import importlib

    from test_closed_form_nodes import PACK, import_pack

    import_pack()
    mod = lambda name: importlib.import_module(f"{PACK}.{name}")  # noqa: E731
    return dict(
        adapters=mod("nodes.adapters"),
        lora=mod("nodes.lora"),
        files=mod("erasers.files.eraser_file"),
        keys=mod("erasers.files.keys"),
        closed_form=mod("nodes.closed_form"),
    )


def test_the_lora_names_are_comfyuis_and_every_spelling_patches_as_comfyui_does(comfy, lora_pack, hidream, tmp_path):
    """ComfyUI reads HiDream LoRAs by its generic spellings and SimpleTuner's (``transformer.<key>``,
    ``lycoris_<key_>``, comfy/lora.py): the pack's name table is exactly the host's, and a LoRA in each
    spelling (kohya and PEFT factors) patches, through Load Erasure LoRA, the weights ComfyUI's own loader
    patches."""
    from test_family_lora_files_comfy import (
        assert_same_weights,
        host_table,
        patched_weights,
        run_node,
        shapes_of,
        spellings,
        write_lora,
    )

    patcher, _ = hidream
    shapes = shapes_of(patcher)
    mine = lora_pack["keys"].comfy_lora_names(shapes, "hidream")
    host = host_table(comfy, patcher)
    assert mine == host, (sorted(set(mine) ^ set(host))[:6], [n for n in host if mine.get(n) != host[n]][:3])
    classes = spellings(host)
    assert {"lora_unet_", "diffusion_model.", "transformer.", "lycoris_"} <= set(classes)
    base = patched_weights(patcher)
    for i, (cls, names) in enumerate(sorted(classes.items())):
        picked = {n: t for n, t in names.items() if "caption_projection" in t or "double_stream_blocks.0." in t}
        for style in ("kohya", "peft"):
            file = f"hidream-{cls.strip('._')}-{style}.safetensors"
            lora = write_lora(tmp_path / file, picked, shapes, style, seed=i)
            theirs, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)
            ours = run_node(lora_pack, tmp_path, patcher, file)
            assert sorted(ours.patches) == sorted(theirs.patches) and ours.patches, (cls, style)
            assert_same_weights(patched_weights(ours), patched_weights(theirs), base)


def test_an_eraser_file_loads_in_comfyuis_lora_loader_with_every_key_matched(
    comfy, lora_pack, hidream, tmp_path, caplog
):
    import logging

    from test_family_lora_files_comfy import assert_same_weights, patched_weights

    patcher, clip = hidream
    erased, eraser = (
        lora_pack["closed_form"].EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "a photo", 1.0).args
    )
    path = lora_pack["files"].save_eraser(eraser, str(tmp_path / "hidream-uce.safetensors"), exact=True)
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        theirs, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert sorted(theirs.patches) == sorted(erased.patches) == sorted(PREFIX + k for k in eraser.keys())
    base = patched_weights(patcher)
    assert_same_weights(patched_weights(theirs), patched_weights(erased), base, list(eraser.keys()))
