"""nodes/adapters.py against fakes of ComfyUI's ModelPatcher and CLIP (no ComfyUI needed).

The fakes follow comfyui_host.md: ``add_patches`` records ``(strength_patch, value, strength_model,
offset, function)`` per key; ``get_key_patches`` returns ``[(weight, convert_func), *patches]``; CLIP
tokens are ``{"l": [[(id, weight), …77]]}`` and ``encode_from_tokens`` concatenates the sections of a
tokens dict along the token axis and returns the *first* section's pooled vector (§4.2, sd1_clip).
"""

import hashlib

import pytest
import torch
from pack_import import pack_module  # shared test helper

adapters = pack_module("nodes.adapters")
errors = pack_module("erasers.errors")
families = pack_module("erasers.files.families")
testing = pack_module("erasers_dev.testing")
uce = pack_module("erasers.edits.uce")
eraser_mod = pack_module("erasers.edits.eraser")
config_mod = pack_module("erasers.config")

Family = families.Family
PREFIX = "diffusion_model."


# -- fakes -----------------------------------------------------------------------------------------


def identity_convert(weight, **kwargs):
    return weight


class FakeModelPatcher:
    """A dict of tensors shared between clones, with per-clone patch lists (like ModelPatcher)."""

    def __init__(self, weights: dict, patches: dict = None):
        self.weights = weights
        self.patches = {k: list(v) for k, v in (patches or {}).items()}
        self.clones = 0

    def clone(self):
        self.clones += 1
        return FakeModelPatcher(self.weights, self.patches)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        applied = []
        for key, value in patches.items():
            if key in self.weights:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                applied.append(key)
        return applied

    def model_state_dict(self, filter_prefix=None):
        return {k: v for k, v in self.weights.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def get_key_patches(self, filter_prefix=None):
        return {
            k: [(w, identity_convert)] + self.patches.get(k, [])
            for k, w in self.model_state_dict(filter_prefix).items()
        }

    def effective(self, key):
        """What ComfyUI would compute for ``key``: W + Σ s·diff (the only patch format used here)."""
        return fake_calculate_weight(self.patches.get(key, []), self.weights[key].float().clone(), key)


def fake_calculate_weight(patches, weight, key):
    for strength, value, strength_model, _, _ in patches:
        diff = value[1][0] if len(value) == 2 else value[0]
        weight = weight * strength_model + strength * diff.float()
    return weight


_WEIGHTS = {}


def fake_model(family=Family.SD1, seed=0, dtype=torch.float16):
    """SD1: random full-size text projections (cached, shared like a real model's); other families:
    zero-memory stand-ins with the right shapes (only detection reads them)."""
    if family != Family.SD1:
        shapes = testing.layer_shapes(family)
        return FakeModelPatcher({PREFIX + k: torch.zeros((), dtype=dtype).expand(s) for k, s in shapes.items()})
    if (seed, dtype) not in _WEIGHTS:
        weights = {PREFIX + k: v for k, v in testing.layer_weights(family, seed=seed, dtype=dtype).items()}
        weights[PREFIX + "input_blocks.0.0.weight"] = torch.randn(320, 4, 3, 3).to(dtype)
        _WEIGHTS[(seed, dtype)] = weights
    return FakeModelPatcher(_WEIGHTS[(seed, dtype)])


class FakeSubTokenizer:
    def __init__(self, start, end, pad, min_length, chunked=True):
        self.start_token, self.end_token, self.pad_token = start, end, pad
        self.min_length, self.chunked = min_length, chunked

    def word_id(self, word):
        return 300 + int(hashlib.md5(word.lower().encode()).hexdigest(), 16) % 40000

    def sections(self, text):
        ids = [self.word_id(w) for w in text.replace(",", " ").split()]
        if not self.chunked:  # T5: one section of any length, padded to min_length
            row = ids + [self.end_token]
            return [row + [self.pad_token] * max(0, self.min_length - len(row))]
        chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
        return [[self.start_token] + c + [self.end_token] + [self.pad_token] * (75 - len(c)) for c in chunks]


class FakeTokenizer:
    def __init__(self, keys):
        for key in keys:
            if key == "t5xxl":
                self.t5xxl = FakeSubTokenizer(None, 1, 0, 16, chunked=False)
            else:
                setattr(self, f"clip_{key}", FakeSubTokenizer(49406, 49407, 0 if key == "g" else 49407, 77))


class FakeCLIP:
    """SD1 (l), SDXL (l+g, 768+1280) or Flux (l+t5xxl, T5 4096-wide) with the ComfyUI token format."""

    WIDTH = {"l": 768, "g": 1280, "h": 1024, "t5xxl": 4096}

    def __init__(self, keys=("l",), seed=0):
        self.keys = tuple(keys)
        self.tokenizer = FakeTokenizer(keys)
        self.cond_stage_model = object()
        gen = torch.Generator().manual_seed(seed)
        self.tables = {k: torch.randn(1024, self.WIDTH[k], generator=gen) for k in keys}
        self.calls = []

    def sub(self, key):
        return getattr(self.tokenizer, key if key == "t5xxl" else f"clip_{key}")

    def tokenize(self, text, return_word_ids=False, **kwargs):
        assert kwargs.get("disable_weights") is True, "concepts must be tokenised literally"
        return {k: [[(t, 1.0) for t in s] for s in self.sub(k).sections(text)] for k in self.keys}

    def encode_section(self, key, section):
        ids = torch.tensor([t for t, _ in section])
        x = self.tables[key][ids % 1024]
        steps = torch.arange(1, len(ids) + 1, dtype=torch.float32)[:, None]
        hidden = torch.tanh(x.cumsum(0) / steps)  # causal, independent of the other sections
        eos = (ids == self.sub(key).end_token).nonzero()[0, 0]
        return hidden, hidden[eos]

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls.append({k: len(v) for k, v in tokens.items()})
        outs, pooled = {}, {}
        for key in self.keys:
            encoded = [self.encode_section(key, s) for s in tokens[key]]
            outs[key] = torch.cat([h for h, _ in encoded])[None]
            pooled[key] = encoded[0][1][None]  # like sd1_clip: first section only
        if self.keys == ("g", "l"):
            cond, pool = torch.cat([outs["l"], outs["g"]], dim=-1), pooled["g"]
        elif "t5xxl" in self.keys:
            cond, pool = outs["t5xxl"], pooled["l"]
        else:
            cond, pool = outs[self.keys[0]], pooled[self.keys[0]]
        return (cond, pool) if return_pooled else cond


def sd1_eraser(model, clip=None, concepts=("Van Gogh",), **kw):
    config = uce.UCEConfig(concepts=list(concepts), **kw)
    return adapters.compute_on_model(model, clip or FakeCLIP(), config)


# -- the text encoder -------------------------------------------------------------------------------


def test_encoder_batches_prompts_in_one_pass_and_reshapes():
    clip = FakeCLIP()
    enc = adapters.ComfyCLIPEncoder(clip)
    prompts = ["a photo of a cat", "Van Gogh", "starry night over the sea"]
    clip.calls.clear()
    batch = enc.encode(prompts)
    assert clip.calls == [{"l": 3}]
    assert batch.hidden.shape == (3, 77, 768) and batch.hidden.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        single = enc.encode([prompt])
        assert torch.equal(batch.hidden[i], single.hidden[0]), f"row {i} is not prompt {prompt!r}"


def test_lengths_and_token_ids_run_from_bos_to_first_eos():
    enc = adapters.ComfyCLIPEncoder(FakeCLIP())
    out = enc.encode(["a photo of a cat", ""])
    assert out.lengths.tolist() == [7, 2]
    assert [len(ids) for ids in out.token_ids] == [7, 2]
    assert out.token_ids[0][0] == 49406 and out.token_ids[0][-1] == 49407
    assert out.token_ids[1] == [49406, 49407]
    assert out.has_bos and out.pooled is None
    assert out.last_subject_index.tolist() == [5, 0]


def test_sdxl_tokenises_l_and_g_and_gives_2048_wide_context():
    clip = FakeCLIP(keys=("g", "l"))
    enc = adapters.ComfyCLIPEncoder(clip)
    assert enc.family == "sdxl" and enc.context_dim == 2048
    clip.calls.clear()
    out = enc.encode(["a cat", "a dog"])
    assert clip.calls == [{"g": 2, "l": 2}]
    assert out.hidden.shape == (2, 77, 2048)
    assert torch.equal(out.hidden[1], enc.encode(["a dog"]).hidden[0])


def test_flux_t5_has_no_bos_and_a_pooled_vector_per_prompt():
    clip = FakeCLIP(keys=("l", "t5xxl"))
    enc = adapters.ComfyCLIPEncoder(clip)
    assert enc.family == "flux" and enc.context_dim == 4096 and enc.context_length == 16
    out = enc.encode(["a cat", "a very fluffy dog"])
    assert out.hidden.shape == (2, 16, 4096)
    assert not out.has_bos
    assert out.lengths.tolist() == [3, 5] and out.token_ids[0][-1] == 1
    for i, prompt in enumerate(["a cat", "a very fluffy dog"]):
        single = enc.encode([prompt])
        assert torch.equal(out.hidden[i], single.hidden[0])
        assert torch.allclose(out.pooled[i], single.pooled[0])
    assert not torch.allclose(out.pooled[0], out.pooled[1])


def test_concept_longer_than_one_chunk_is_refused():
    enc = adapters.ComfyCLIPEncoder(FakeCLIP())
    with pytest.raises(errors.ConceptTooLong, match="one chunk"):
        enc.encode(["word " * 80])
    t5 = adapters.ComfyCLIPEncoder(FakeCLIP(keys=("l", "t5xxl")))
    with pytest.raises(errors.ConceptTooLong, match="T5 tokens"):
        t5.encode(["word " * 20])


# -- the model side ---------------------------------------------------------------------------------


def test_model_family_from_patcher_shapes():
    assert adapters.model_family(fake_model(Family.SD1)) == Family.SD1
    assert adapters.model_family(fake_model(Family.SDXL)) == Family.SDXL


def test_clip_of_another_family_is_refused_before_anything_is_patched():
    model = fake_model(Family.SD1)
    with pytest.raises(errors.FamilyMismatch, match="2048"):
        sd1_eraser(model, FakeCLIP(keys=("g", "l")))
    assert model.patches == {} and model.clones == 0


def test_strength_zero_returns_an_unpatched_clone():
    model = fake_model()
    eraser = sd1_eraser(model)
    out = adapters.apply_eraser(model, eraser, 0.0)
    assert out is not model and out.patches == {}


def test_patches_are_strength_times_delta_on_a_clone_and_the_original_is_untouched():
    model = fake_model()
    before = {k: v.clone() for k, v in model.weights.items()}
    eraser = sd1_eraser(model, concepts=("Van Gogh", "Monet"))
    out = adapters.apply_eraser(model, eraser, 0.7)
    assert model.patches == {}
    assert all(torch.equal(before[k], model.weights[k]) for k in before)
    assert sorted(out.patches) == sorted(PREFIX + k for k in eraser.keys())
    assert len(out.patches) == 32
    for key in eraser.keys():
        ((strength, value, strength_model, offset, function),) = out.patches[PREFIX + key]
        assert (strength, strength_model, offset, function) == (0.7, 1.0, None, None)
        kind, (delta,) = value
        assert kind == "diff" and delta.dtype == torch.float16 and delta.shape == before[PREFIX + key].shape
        assert torch.equal(delta, eraser.dense(key, torch.float16))
        expected = before[PREFIX + key].float() + 0.7 * eraser.dense(key).half().float()
        assert torch.allclose(out.effective(PREFIX + key), expected, atol=1e-6)
    assert eraser.dense(eraser.keys()[0]).abs().max() > 1e-3, "the edit must not be trivially zero"


def test_eraser_for_another_family_or_unknown_keys_raises_before_patching():
    sd1 = fake_model(Family.SD1)
    eraser = sd1_eraser(sd1)
    sdxl = fake_model(Family.SDXL)
    with pytest.raises(errors.FamilyMismatch, match="SD1"):
        adapters.apply_eraser(sdxl, eraser, 1.0)
    assert sdxl.clones == 0 and sdxl.patches == {}
    key = eraser.keys()[0]
    eraser.deltas["input_blocks.99.1.transformer_blocks.0.attn2.to_k.weight"] = eraser.deltas[key]
    with pytest.raises(errors.UnknownKeys, match="input_blocks.99"):
        adapters.apply_eraser(sd1, eraser, 1.0)
    assert sd1.clones == 0 and sd1.patches == {}


def test_base_weights_include_patches_already_on_the_model(monkeypatch):
    monkeypatch.setattr(adapters, "host_calculate_weight", fake_calculate_weight)
    model = fake_model()
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    lora = torch.randn(320, 768).half()
    patched = model.clone()
    patched.add_patches({PREFIX + key: ("diff", (lora,))}, 0.5)
    base = adapters.canonical_base_weights(patched, [key])
    assert torch.allclose(base[key], model.weights[PREFIX + key].float() + 0.5 * lora.float())
    assert base[key].dtype == torch.float32
    # a fresh copy: editing it must not reach the model
    base[key].zero_()
    assert model.weights[PREFIX + key].abs().sum() > 0
    # the edit is solved on the patched weights, so erasing on top of the LoRA differs from without it
    on_lora = sd1_eraser(patched)
    plain = sd1_eraser(model)
    assert not torch.allclose(on_lora.dense(key), plain.dense(key))


def test_base_weights_fall_back_to_model_state_dict(monkeypatch):
    monkeypatch.delattr(FakeModelPatcher, "get_key_patches")
    model = fake_model()
    key = "middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    base = adapters.canonical_base_weights(model, [key])
    assert torch.equal(base[key], model.weights[PREFIX + key].float())


def test_progress_is_reported_while_encoding_concepts():
    model = fake_model()
    seen = []
    names = [f"artist number {i}" for i in range(70)]
    config = uce.UCEConfig(concepts=names)
    adapters.compute_on_model(model, FakeCLIP(), config, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(64, 70), (70, 70)]


# -- the node's inputs --------------------------------------------------------------------------------


def test_build_config_parses_text_boxes_and_params():
    config = adapters.build_config(
        "uce", "Van Gogh\nMonet, Degas", "art", "Picasso", "art", '{"lam": 0.25, "variant": "2023"}', 0
    )
    assert config.concepts == ["Van Gogh", "Monet", "Degas"] and config.anchors == ["art"]
    assert config.preserve == ["Picasso"] and config.concept_type == "art"
    assert config.lam == 0.25 and config.variant == "2023" and config.rank_cap is None
    pairs = adapters.build_config("uce", "cat", params="lam=2, erase_scale=0.5\nvariant=2025", rank_cap=4)
    assert (pairs.lam, pairs.erase_scale, pairs.variant, pairs.rank_cap) == (2, 0.5, "2025", 4)


@pytest.mark.parametrize(
    "params, message",
    [
        ("lambda=3", "unknown parameters"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "name=value"),
        ("concepts=dog", "their own inputs"),
        ("variant=1999", "variant"),
    ],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        adapters.build_config("uce", "cat", params=params)


def test_empty_concepts_are_refused():
    with pytest.raises(errors.EmptyConceptList):
        adapters.build_config("uce", "  \n # comment only\n")
