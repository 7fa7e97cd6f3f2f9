"""Closed-form erasure on the newer model families, on tiny instances of ComfyUI's own model classes.

Each family is a reduced random-weight model built from ComfyUI's config class (``model_detection`` or
the ``supported_models`` class itself), in a real ``ModelPatcher``. Text comes from ComfyUI's shipped
tokenizer where the snapshot has it (T5 for Chroma, Qwen2.5 for Qwen-Image, Qwen3 for Flux.2-klein and
Z-Image), behind a stand-in encoder of the family's width (the real encoders are billions of weights);
Wan's UMT5 tokenizer ships inside the checkpoint, so it is a stand-in too. The stand-in for Qwen-Image
drops the chat-template prefix exactly as ComfyUI's QwenImageTEModel does.

Checked per family, through the host's own modules (the norm/MLP in front and the edited Linear):
detection by class, the closed form's equations at the edited layer, strength 0, the wrong CLIP width.
Needs ComfyUI ≥ 0.2x (the classes); skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from suppression_models import random_patcher

PREFIX = "diffusion_model."
# small λ: the ridge solution then meets its targets almost exactly (few keys). The random tiny models' keys
# are small (Wan's text_embedding output has |k|² ≈ 3e-3), so λ must be far below |k|².
LAM = 1e-7

CHROMA = dict(
    image_model="chroma",
    in_channels=64,
    out_channels=64,
    context_in_dim=4096,
    hidden_size=64,
    mlp_ratio=2.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    in_dim=64,
    out_dim=64,
    hidden_dim=64,
    n_layers=1,
    txt_ids_dims=[],
    vec_in_dim=None,
)
FLUX2 = dict(
    image_model="flux2",
    in_channels=16,
    out_channels=16,
    vec_in_dim=None,
    context_in_dim=96,
    hidden_size=64,
    mlp_ratio=2.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 8, 8, 8],
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    guidance_embed=False,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    txt_norm=True,
)
QWEN = dict(
    image_model="qwen_image",
    in_channels=64,
    out_channels=16,
    num_layers=1,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
)
LUMINA = dict(
    image_model="lumina2",
    patch_size=2,
    in_channels=16,
    dim=64,
    cap_feat_dim=40,
    n_layers=1,
    n_refiner_layers=1,
    qk_norm=True,
    n_heads=2,
    n_kv_heads=2,
    axes_dims=[8, 12, 12],
    axes_lens=[64, 32, 32],
    rope_theta=256.0,
    ffn_dim_multiplier=1.0,
)
#: AuraFlow (supported_models.AuraFlow built directly: detection matches it only at cond_seq_dim 2048)
AURA = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    dim=64,
    n_layers=2,
    n_double_layers=1,
    n_heads=2,
    global_conddim=64,
    cond_seq_dim=48,
    max_seq=64,
)
WAN = dict(
    image_model="wan2.1",
    model_type="t2v",
    dim=64,
    out_dim=16,
    num_heads=2,
    ffn_dim=64,
    num_layers=2,
    patch_size=(1, 2, 2),
    freq_dim=256,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
    in_dim=16,
    text_dim=40,
)


class StandInCLIP:
    """``comfy.sd.CLIP``'s tokenize/encode API over a real (or stand-in) tokenizer: each token id → a fixed
    random vector, mixed along the sequence (``causal``: running mean, as a decoder LLM; otherwise the
    sequence mean is added, so padding would change every row, as in T5)."""

    def __init__(self, tokenizer, width, causal=True, drop=None, seed=0):
        self.tokenizer, self.width, self.causal, self.drop = tokenizer, width, causal, drop
        self.cond_stage_model = type(f"StandIn{type(tokenizer).__name__}", (), {})()
        self.seed = seed
        self.calls = 0

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def row(self, token):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(token))
        return torch.randn(self.width, generator=gen)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.calls += 1
        (sections,) = tokens.values()
        ids = [t[0] for t in sections[0]]
        x = torch.stack([self.row(t) for t in ids])
        if self.causal:
            x = torch.tanh(x.cumsum(0) / torch.arange(1, len(ids) + 1)[:, None])
        else:
            x = torch.tanh(x + x.mean(0, keepdim=True))
        if self.drop is not None:
            x = x[self.drop(ids) :]
        cond = x[None]
        return (cond, None) if return_pooled else cond


def qwen_image_drop(ids):
    """QwenImageTEModel.encode_token_weights: keep what follows the 2nd <|im_start|> and 'user\\n'."""
    starts = [i for i, t in enumerate(ids) if t == 151644][:2]
    end = starts[-1]
    if ids[end + 1 : end + 3] == [872, 198]:
        end += 3
    return end


class WordTokenizer:
    """UMT5's layout (the SentencePiece model ships inside Wan's text-encoder file): words → ids, </s> = 1,
    padded with 0 to 512."""

    class Sub:
        pad_token, end_token, min_length = 0, 1, 512

    umt5xxl = Sub()

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        ids = [2 + int(hashlib.md5(w.lower().encode()).hexdigest(), 16) % 30000 for w in text.split()] + [1]
        ids += [0] * (512 - len(ids))
        return {"umt5xxl": [[(i, 1.0) for i in ids]]}


def config_of(comfy, unet_config, direct=None):
    """The model config ComfyUI builds from ``unet_config`` (or the config class ``direct``); an older
    ComfyUI whose class takes other parameters skips the family instead of failing."""
    try:
        if direct is not None:
            return direct(dict(unet_config))
        cfg = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
        assert cfg is not None, f"ComfyUI detected no model for {unet_config['image_model']}"
        return cfg
    except TypeError as exc:
        pytest.skip(f"this ComfyUI's {unet_config['image_model']} takes other parameters: {exc}")


def built(comfy, cfg, seed):
    try:
        return random_patcher(comfy, cfg, seed)
    except TypeError as exc:
        pytest.skip(f"this ComfyUI's {type(cfg).__name__} model takes other parameters: {exc}")


def build(comfy, name):
    """(patcher, clip, host_layers) for one family; host_layers(dm, key) is the host's module chain from
    the text encoder's output to the edited Linear's output, for the canonical key it edits."""
    tokenizers = lambda module: pytest.importorskip(f"comfy.text_encoders.{module}")  # noqa: E731
    if name == "chroma":
        clip = StandInCLIP(tokenizers("pixart_t5").PixArtTokenizer(), 4096, causal=False)
        import dataclasses

        from comfy.ldm.chroma.model import ChromaParams

        # 0.3.64's ChromaParams has no txt_ids_dims (RoPE axes of text positions, [] = Chroma's default)
        config = {
            k: v
            for k, v in CHROMA.items()
            if k in {f.name for f in dataclasses.fields(ChromaParams)} | {"image_model"}
        }
        return built(comfy, config_of(comfy, config), 11), clip, lambda dm, key: dm.txt_in
    if name == "flux2":
        clip = StandInCLIP(tokenizers("flux").KleinTokenizer(), 96)
        layer = lambda dm, key: torch.nn.Sequential(dm.txt_norm, dm.txt_in)  # noqa: E731
        return built(comfy, config_of(comfy, FLUX2), 12), clip, layer
    if name == "qwen_image":
        clip = StandInCLIP(tokenizers("qwen_image").QwenImageTokenizer(), 48, drop=qwen_image_drop)
        layer = lambda dm, key: torch.nn.Sequential(dm.txt_norm, dm.txt_in)  # noqa: E731
        return built(comfy, config_of(comfy, QWEN), 13), clip, layer
    if name in ("lumina2", "zimage"):
        import comfy.supported_models as sm

        if name == "zimage":
            # the detector picks ZImage only at Z-Image's full width (3840): the config class is built directly
            cfg = config_of(comfy, LUMINA, getattr(sm, "ZImage", None) or pytest.skip("no ZImage config"))
            tok = tokenizers("z_image").ZImageTokenizer()
        else:
            cfg, tok = config_of(comfy, LUMINA), tokenizers("qwen_image").QwenImageTokenizer()
        return built(comfy, cfg, 14), StandInCLIP(tok, 40), lambda dm, key: dm.cap_embedder
    if name == "wan":
        clip = StandInCLIP(WordTokenizer(), 40, causal=False)

        def wan_layer(dm, key):
            block, proj = int(key.split(".")[1]), key.split(".")[3]
            return torch.nn.Sequential(dm.text_embedding, getattr(dm.blocks[block].cross_attn, proj))

        return built(comfy, config_of(comfy, WAN), 15), clip, wan_layer
    if name == "auraflow":
        import comfy.supported_models as sm

        clip = StandInCLIP(tokenizers("aura_t5").AuraT5Tokenizer(), 48, causal=False)
        patcher = built(comfy, config_of(comfy, AURA, sm.AuraFlow), 16)
        # at the shared init (σ 0.02) AuraFlow's gated, modulated residuals leave the text's effect on the output
        # below float rounding (1e-9): its matrices get a fan-in scale (σ = 1/√in) so the text matters
        with torch.no_grad():
            for p in patcher.model.diffusion_model.parameters():
                if p.ndim == 2:
                    p.mul_(1.0 / (0.02 * p.shape[1] ** 0.5))
        return patcher, clip, lambda dm, key: dm.cond_seq_linear
    raise KeyError(name)


FAMILIES = {
    # family value → (host class, model_config class, the canonical keys the edit must patch)
    "chroma": ("Chroma", "Chroma", ["txt_in.weight"]),
    "flux2": ("Flux2", "Flux2", ["txt_in.weight"]),
    "qwen_image": ("QwenImage", "QwenImage", ["txt_in.weight"]),
    "zimage": ("Lumina2", "ZImage", ["cap_embedder.1.weight"]),
    "lumina2": ("Lumina2", "Lumina2", ["cap_embedder.1.weight"]),
    "wan": ("WAN21", "WAN21_T2V", [f"blocks.{i}.cross_attn.{p}.weight" for i in range(2) for p in "kv"]),
}
#: Tier 2 (issue #16: closed form and token suppression): not in FAMILIES, whose LoRA-name, eraser-file and
#: example-workflow tests are Tier 1's
TIER2 = {"auraflow": ("AuraFlow", "AuraFlow", ["cond_seq_linear.weight"])}
ALL_FAMILIES = {**FAMILIES, **TIER2}


@pytest.fixture(scope="module")
def pack(comfy):
    import importlib

    from test_closed_form_nodes import PACK, import_pack  # the pack imported as ComfyUI imports a custom node

    import_pack()
    return importlib.import_module(f"{PACK}.nodes.closed_form"), importlib.import_module(f"{PACK}.nodes.adapters")


@pytest.fixture(scope="module", params=list(ALL_FAMILIES))
def family(request, comfy):
    import comfy.model_base as mb

    host, _, _ = ALL_FAMILIES[request.param]
    if not hasattr(mb, host):
        pytest.skip(f"this ComfyUI has no {host} class")
    patcher, clip, layer = build(comfy, request.param)
    return request.param, patcher, clip, layer


def host_output(comfy, model, layer, key, x):
    """The edited layer's output on ``x`` through the host's own modules, with ``model``'s patches applied
    by ComfyUI (patch_model), then unpatched."""
    model.patch_model(device_to=torch.device("cpu"))
    try:
        with torch.no_grad():
            return layer(model.model.diffusion_model, key)(x.to(torch.float32)).double()
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))


def last_word_row(adapters, clip, prompt):
    enc = adapters.ComfyCLIPEncoder(clip).encode([prompt])
    return enc.hidden[0, int(enc.last_subject_index[0])]


def test_the_family_comes_from_the_class(pack, family):
    _, adapters = pack
    name, patcher, _, _ = family
    host, config, _ = ALL_FAMILIES[name]
    assert type(patcher.model).__name__ == host and type(patcher.model.model_config).__name__ == config
    assert adapters.model_family(patcher).value == name


def test_uce_meets_its_equations_at_the_edited_layer(comfy, pack, family):
    """W′ c = W c* for the erased concept, W′ p = W p for the preserved one, through the host's modules."""
    nodes, adapters = pack
    name, patcher, clip, layer = family
    erased, eraser = nodes.EraserClosedForm.execute(
        patcher, clip, "uce", "Van Gogh", "a painter", "a photo of a cat", 1.0, params=f"lam={LAM}"
    ).args
    assert sorted(eraser.keys()) == sorted(ALL_FAMILIES[name][2]) and eraser.family.value == name
    assert sorted(erased.patches) == sorted(PREFIX + k for k in ALL_FAMILIES[name][2])
    assert patcher.patches == {}, "the node patched its input model"
    c, c_star, p = (last_word_row(adapters, clip, t) for t in ("Van Gogh", "a painter", "a photo of a cat"))
    for key in eraser.keys():
        before = host_output(comfy, patcher, layer, key, torch.stack([c, c_star, p]))
        after = host_output(comfy, erased, layer, key, torch.stack([c, p]))
        moved = (before[0] - before[1]).norm()
        assert moved > 0
        assert (after[0] - before[1]).norm() < 0.02 * moved, f"{key}: the concept did not map to the anchor"
        assert (after[1] - before[2]).norm() < 0.02 * moved, f"{key}: the preserved prompt moved"


def test_strength_zero_patches_nothing(pack, family):
    nodes, _ = pack
    _, patcher, clip, _ = family
    same, eraser = nodes.EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "", 0.0).args
    assert same.patches == {} and same is not patcher and len(eraser.keys()) > 0


@pytest.mark.parametrize("method", ["rece", "speed", "mace"])
def test_the_other_closed_forms_run_and_move_the_concept(comfy, pack, family, method):
    nodes, adapters = pack
    name, patcher, clip, layer = family
    erased, eraser = nodes.EraserClosedForm.execute(patcher, clip, method, "Van Gogh", "", "a photo", 1.0).args
    # SPEED edits the V projections only by default (its paper's setting); the others edit every K/V
    assert eraser.keys() and set(eraser.keys()) <= set(ALL_FAMILIES[name][2])
    key = eraser.keys()[0]
    c = last_word_row(adapters, clip, "Van Gogh")[None]
    assert not torch.allclose(host_output(comfy, erased, layer, key, c), host_output(comfy, patcher, layer, key, c))


def test_a_clip_of_the_wrong_width_is_refused_by_name(pack, family):
    nodes, _ = pack
    name, patcher, clip, _ = family
    wrong = StandInCLIP(clip.tokenizer, clip.width + 8, causal=clip.causal, drop=clip.drop)
    with pytest.raises(ValueError, match=rf"{ALL_FAMILIES[name][0]}.*{clip.width}-wide.*{clip.width + 8}-wide"):
        nodes.EraserClosedForm.execute(patcher, wrong, "uce", "Van Gogh", "", "", 1.0)


def test_an_unknown_class_is_refused_by_name_before_anything_runs(comfy, pack):
    import comfy.model_base as mb

    nodes, _ = pack
    patcher, clip, _ = build(comfy, "chroma")
    patcher.model.__class__ = type("MysteryDiT", (mb.Chroma,), {})  # a class the table does not know
    calls = clip.calls
    with pytest.raises(ValueError, match="MysteryDiT.*not in the pack's family table"):
        nodes.EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "", 1.0)
    assert clip.calls == calls, "the CLIP encoded concepts for a model that is refused"


def test_a_variant_config_of_a_supported_class_is_refused_by_name(comfy, pack):
    import comfy.supported_models as sm

    nodes, _ = pack
    patcher, clip, _ = build(comfy, "wan")
    patcher.model.model_config = sm.WAN21_I2V(dict(WAN, model_type="i2v"))
    with pytest.raises(ValueError, match="WAN21 is loaded with the config WAN21_I2V"):
        nodes.EraserClosedForm.execute(patcher, clip, "uce", "Van Gogh", "", "", 1.0)
