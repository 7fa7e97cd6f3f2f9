"""The family table (erasers/families/): lookup by host class, refusals by name, the key maps in front of
the edited Linear, and the ComfyUI adapter's use of it, with fakes (no ComfyUI)."""

from __future__ import annotations

import pytest
import torch
from pack_import import pack_module

families = pack_module("erasers.families")
key_map = pack_module("erasers.families.key_map")
ff = pack_module("erasers.files.families")
adapters = pack_module("nodes.adapters")
text = pack_module("erasers.text")
Family = ff.Family


@pytest.mark.parametrize(
    "host, config, family",
    [
        ("Chroma", "Chroma", Family.CHROMA),
        ("Flux2", "Flux2", Family.FLUX2),
        ("Flux", "FluxSchnell", Family.FLUX),
        ("QwenImage", "QwenImage", Family.QWEN_IMAGE),
        ("Lumina2", "ZImage", Family.ZIMAGE),
        ("Lumina2", "Lumina2", Family.LUMINA2),
        ("WAN21", "WAN21_T2V", Family.WAN),
        ("WAN22", "WAN22_T2V", Family.WAN),
    ],
)
def test_lookup_by_class(host, config, family):
    record = families.lookup(host, config)
    assert record.family == family and set(record.methods) == {"uce", "rece", "speed", "mace"}
    assert record.context_key and record.text_encoder and record.text_tokens


def test_legacy_unet_classes_take_the_family_from_their_keys():
    assert families.lookup("BaseModel", "SD15").sniff and families.lookup("SDXL", "SDXL").family is None


@pytest.mark.parametrize(
    "host, config, message",
    [
        ("HunyuanDiT", "HunyuanDiT", "HunyuanDiT .*not in the pack's family table"),
        ("HunyuanVideo15", "HunyuanVideo15", "HunyuanVideo 1.5 \\(HunyuanVideo15\\) is refused by name: .*byt5_in"),
        ("PixArt", "PixArtSigma", "PixArt-α / PixArt-Σ \\(PixArt\\) is refused by name: .*kv_linear"),
        ("Kandinsky5", "Kandinsky5", "Kandinsky 5 video \\(Kandinsky5\\) is refused by name: .*timestep"),
        ("LongCatImage", "LongCatImage", "LongCat-Image \\(LongCatImage\\) is refused by name"),
        ("HiDream", "HiDreamX", "HiDream is loaded with the config HiDreamX"),
        ("WAN21", "WAN21_I2V", "WAN21 is loaded with the config WAN21_I2V"),
        ("Lumina2", "ZImagePixelSpace", "Lumina2 is loaded with the config ZImagePixelSpace"),
    ],
)
def test_refused_by_name(host, config, message):
    with pytest.raises(ValueError, match=message):
        families.lookup(host, config)


def test_rms_norm_equals_torch_rmsnorm():
    x = torch.randn(3, 5, 16) * 4
    for eps in (None, 1e-6, 0.5):
        norm = torch.nn.RMSNorm(16, eps=eps)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(16))
            expected = norm(x)
        got = key_map.rms_norm(x, norm.weight.detach(), eps)
        torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-6)


def test_gelu_mlp_equals_wans_text_embedding():
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 8))
    x = torch.randn(2, 7, 12)
    w = {f"text_embedding.{k}": v.detach() for k, v in mlp.state_dict().items()}
    pre = families.PreMLP("text_embedding.0", "text_embedding.2")
    f = key_map.build_key_map(pre, w)
    torch.testing.assert_close(f(x).float(), mlp(x).detach(), rtol=1e-5, atol=1e-6)
    assert key_map.map_width(pre, w) == 12


def test_a_missing_optional_norm_maps_nothing():
    assert key_map.build_key_map(families.PreNorm("txt_norm.weight", "txt_norm"), {}) is None


class FixedEncoder:
    family, context_length = "fake", 77

    def __init__(self, width):
        self.width = width

    def encode(self, prompts):
        return text.PromptEncoding(
            torch.ones(len(prompts), 4, self.width), torch.full((len(prompts),), 3), [[1]] * len(prompts)
        )


def test_key_map_encoder_maps_rows_and_refuses_another_width():
    enc = key_map.KeyMapEncoder(FixedEncoder(6), lambda x: x[..., :3] * 2, 6, 3, "Qwen-Image")
    out = enc.encode(["a", "b"])
    assert out.hidden.shape == (2, 4, 3) and torch.equal(out.hidden, torch.full((2, 4, 3), 2.0))
    assert enc.context_dim == 3
    with pytest.raises(ValueError, match="Qwen-Image reads 5-wide text embeddings.*6-wide"):
        key_map.KeyMapEncoder(FixedEncoder(6), lambda x: x, 5, 5, "Qwen-Image").encode(["a"])


@pytest.mark.parametrize(
    "keys, family",
    [
        (
            {"txt_in.weight": (8, 4), "double_blocks.0.x": (1,), "distilled_guidance_layer.in_proj.weight": (1, 1)},
            Family.CHROMA,
        ),
        (
            {"txt_in.weight": (8, 4), "double_blocks.0.x": (1,), "double_stream_modulation_img.lin.weight": (1, 1)},
            Family.FLUX2,
        ),
        ({"txt_in.weight": (8, 4), "double_blocks.0.x": (1,)}, Family.FLUX),
        ({"txt_in.weight": (8, 4), "txt_norm.weight": (4,), "img_in.weight": (8, 64)}, Family.QWEN_IMAGE),
        ({"cap_embedder.1.weight": (3840, 2560)}, Family.ZIMAGE),
        ({"cap_embedder.1.weight": (2304, 2304)}, Family.LUMINA2),
        ({"text_embedding.0.weight": (8, 4), "blocks.0.cross_attn.k.weight": (8, 8)}, Family.WAN),
    ],
)
def test_key_sniffing_for_files_knows_the_new_families(keys, family):
    assert ff.detect_family(keys) == family


def test_wan_layers_in_block_order_and_only_cross_attention():
    shapes = {
        f"blocks.{i}.{a}.{p}.weight": (8, 8) for i in (0, 2, 10) for a in ("self_attn", "cross_attn") for p in "kvq"
    }
    specs = ff.layer_specs(shapes, Family.WAN)
    assert [s.key for s in specs] == [f"blocks.{i}.cross_attn.{p}.weight" for i in (0, 2, 10) for p in "kv"]
    assert [s.kind for s in specs] == ["k", "v"] * 3


# -- the ComfyUI adapter with fakes -----------------------------------------------------------------


class Chroma:  # a stand-in carrying the host class's *name*: the adapter reads only the name
    def __init__(self, config):
        self.model_config = config


class Patcher:
    def __init__(self, base, weights):
        self.model, self.weights = base, weights

    def model_state_dict(self, filter_prefix=None):
        return dict(self.weights)


def test_adapter_family_is_the_class_not_the_keys():
    flux_keys = {
        "diffusion_model.txt_in.weight": torch.zeros(8, 4),
        "diffusion_model.double_blocks.0.a": torch.zeros(1),
    }
    assert adapters.model_family(Patcher(Chroma(type("Chroma", (), {})()), flux_keys)) == Family.CHROMA
    mystery = type("MysteryDiT", (), {"model_config": None})()
    with pytest.raises(ValueError, match="MysteryDiT is not in the pack's family table"):
        adapters.model_family(Patcher(mystery, flux_keys))


class ChatTokenizerCLIP:
    """A chat-template tokenizer (prefix 3 tokens, suffix 2) whose encoder drops the first 2 rows, like
    Qwen-Image's; refuses a second ``disable_weights`` like ComfyUI's chat tokenizers."""

    class Sub:
        pad_token = 0

    def __init__(self):
        self.tokenizer = type("Tok", (), {"qwen": self.Sub()})()
        self.cond_stage_model = object()

    def tokenize(self, prompt, return_word_ids=False, **kwargs):
        if "disable_weights" in kwargs:
            raise TypeError("got multiple values for keyword argument 'disable_weights'")
        words = [100 + len(w) * 7 + i for i, w in enumerate(prompt.split())]
        return {"qwen": [[(t, 1.0) for t in [1, 2, 3] + words + [8, 9]]]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        ids = torch.tensor([t for t, _ in tokens["qwen"][0]], dtype=torch.float32)
        cond = torch.stack([ids, ids * 0 + 1], -1)[2:][None]  # row = (token id, 1), 2 prefix rows dropped
        return (cond, None) if return_pooled else cond


def test_generic_encoder_finds_the_last_word_behind_a_dropped_template_prefix():
    enc = adapters.ComfyCLIPEncoder(ChatTokenizerCLIP())
    assert enc.generic and not enc.needs_pooled
    out = enc.encode(["a red car", "", "dog"])
    last = out.hidden[torch.arange(3), out.last_subject_index][:, 0].tolist()
    assert last[0] == 100 + 3 * 7 + 2 and last[2] == 100 + 3 * 7  # 'car' and 'dog'
    assert last[1] == 3  # the empty prompt: the row before the suffix (the kept template end)
    assert out.token_ids[0] == [3, 107, 122, 123, 8, 9] and out.has_bos  # row i ↔ id i; one template row kept


def test_hidream_streams_follow_the_llama_layers_and_refuse_another_layout():
    from erasers.families import hidream

    keys = [f"caption_projection.{i}.linear.weight" for i in range(5)] + [hidream.POOLED_KEY]
    streams = hidream.caption_streams(keys, [0, 1, 3, 3])
    assert [streams[f"caption_projection.{i}.linear.weight"] for i in range(5)] == [
        "llama.0", "llama.1", "llama.3", "llama.3", "t5"
    ]  # fmt: skip
    assert streams[hidream.POOLED_KEY] == "t5"  # the pooled embedder runs with the T5 stream (pooled vectors)
    assert list(hidream.group_by_stream(streams)) == ["t5", "llama.0", "llama.1", "llama.3"]
    with pytest.raises(ValueError, match="HiDream-I1 has one caption projection per block"):
        hidream.caption_streams(keys[:4], [0, 1, 3, 3])
    assert len(hidream.caption_streams([f"caption_projection.{i}.linear.weight" for i in range(49)])) == 49
