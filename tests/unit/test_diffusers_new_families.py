"""The newer families through the diffusers API (#16): Chroma, Flux.2 (klein), Qwen-Image, Z-Image, Lumina 2,
Wan text-to-video and AuraFlow, on the real diffusers 0.42 pipeline classes with tiny random modules, no downloads.

Each pipeline is built from its own class: the transformer from its real config class with one or two
blocks and widths of 16–48; the text encoder from the real ``transformers`` class the pipeline uses (T5,
UMT5, Qwen3, Qwen2.5-VL, Gemma 2) with random weights and 1–27 layers; the tokenizer is a
``PreTrainedTokenizerFast`` over a small word-level vocabulary with the family's special tokens, chat
template, start / end tokens and padding side (the real tokenizers are downloads), so every prompt goes
through the pipeline's own ``encode_prompt`` (template, dropped head, padding, mask) unchanged. Flux.2 is
tested through ``Flux2KleinPipeline`` (Qwen3); ``Flux2Pipeline`` (Mistral-3 with a Pixtral processor) takes
the same path but is not built here. HiDream-I1 (one text stream per projection): test_diffusers_hidream.py.
"""

from __future__ import annotations

import pytest

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from erasers.edits.speed import SPEEDConfig  # noqa: E402
from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.errors import ConceptTooLong, FamilyMismatch, NonFiniteResult, UnsupportedFamily  # noqa: E402
from erasers.files.families import Family  # noqa: E402
from erasers_diffusers import api  # noqa: E402
from erasers_diffusers import families as dfam  # noqa: E402

WORDS = (
    "a photo of cat dog van gogh painting red blue x describe the image you are an assistant <Prompt Start> "
    "user system"
).split()


def tokenizer(specials, pad="<pad>", bos=None, eos=None, side="right", template=None):
    vocab = {t: i for i, t in enumerate([pad] + specials + WORDS + ["\n", "<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    if bos or eos:
        single = " ".join(([bos] if bos else []) + ["$A"] + ([eos] if eos else []))
        tk.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]
        )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=pad, unk_token="<unk>", bos_token=bos, eos_token=eos, padding_side=side
    )
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos)]})
    if template:
        tok.chat_template = template
    return tok


CHAT = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
VOCAB = len(WORDS) + 16
SCHED = diffusers.FlowMatchEulerDiscreteScheduler


def t5(cls, width=16):
    cfg = getattr(transformers, cls.replace("EncoderModel", "Config"))(
        vocab_size=VOCAB, d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    return getattr(transformers, cls)(cfg).eval()


def qwen3(cls, layers, width=16):
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    return getattr(transformers, cls)(cfg).eval()


def build(name):
    """A real diffusers pipeline of the family with tiny random modules (seeded)."""
    torch.manual_seed(0)
    if name == "chroma":
        tr = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
            approximator_hidden_dim=16, approximator_layers=1,
        )  # fmt: skip
        tok = tokenizer(["</s>"], eos="</s>")
        return diffusers.ChromaPipeline(SCHED(), None, t5("T5EncoderModel"), tok, tr)
    if name == "flux2":
        tr = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=3 * 8, timestep_guidance_channels=16,
            axes_dims_rope=(2, 2, 2, 2),
        )  # fmt: skip
        tok = tokenizer(list(CHAT), template=QWEN3_TEMPLATE)
        return diffusers.Flux2KleinPipeline(SCHED(), None, qwen3("Qwen3ForCausalLM", 27, 8), tok, tr)
    if name == "qwen":
        tr = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
        vision = dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=2,
            spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4,
        )  # fmt: skip
        text = dict(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        )  # fmt: skip
        te = transformers.Qwen2_5_VLForConditionalGeneration(
            transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        ).eval()
        tok = tokenizer(list(CHAT))
        pipe = diffusers.QwenImagePipeline(SCHED(), None, te, tok, tr)
        # the pipeline drops the system part of its template by count (34 tokens of the real Qwen tokenizer);
        # with this vocabulary the same part is this many tokens
        system = pipe.prompt_template_encode.split("<|im_start|>user")[0]
        pipe.prompt_template_encode_start_idx = len(tok(system)["input_ids"])
        return pipe
    if name == "zimage":
        tr = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
        )  # fmt: skip
        tok = tokenizer(list(CHAT), template=QWEN3_TEMPLATE)
        return diffusers.ZImagePipeline(SCHED(), None, qwen3("Qwen3Model", 2), tok, tr)
    if name == "lumina2":
        tr = diffusers.Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
            num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
            cap_feat_dim=16,
        )  # fmt: skip
        cfg = transformers.Gemma2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8,
        )  # fmt: skip
        tok = tokenizer(["<bos>", "<eos>"], bos="<bos>")
        pipe = diffusers.Lumina2Pipeline(tr, SCHED(), None, transformers.Gemma2Model(cfg).eval(), tok)
        pipe.system_prompt = "you are an assistant"
        return pipe
    if name == "auraflow":
        tr = diffusers.AuraFlowTransformer2DModel(
            sample_size=8, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pos_embed_max_size=16,
        )  # fmt: skip
        tok = tokenizer(["</s>"], eos="</s>")
        return diffusers.AuraFlowPipeline(tok, t5("UMT5EncoderModel"), None, tr, SCHED())
    tr = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
    )  # fmt: skip
    tok = tokenizer(["</s>"], eos="</s>")
    return diffusers.WanPipeline(tok, t5("UMT5EncoderModel"), None, SCHED(), tr)


FAMILIES = {
    "chroma": Family.CHROMA,
    "flux2": Family.FLUX2,
    "qwen": Family.QWEN_IMAGE,
    "zimage": Family.ZIMAGE,
    "lumina2": Family.LUMINA2,
    "wan": Family.WAN,
    "auraflow": Family.AURAFLOW,
}
EDITED = {
    "chroma": ["context_embedder.weight"],
    "flux2": ["context_embedder.weight"],
    "qwen": ["txt_in.weight"],
    "zimage": ["cap_embedder.1.weight"],
    "lumina2": ["time_caption_embed.caption_embedder.1.weight"],
    "wan": [f"blocks.{i}.attn2.to_{kv}.weight" for i in range(2) for kv in "kv"],
    "auraflow": ["context_embedder.weight"],
}
_CACHE = {}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    if request.param not in _CACHE:
        _CACHE[request.param] = build(request.param)
    pipe = _CACHE[request.param]
    yield request.param, pipe
    assert getattr(pipe.transformer, api.HANDLE_ATTR, None) is None, "a test left an eraser applied"


def state(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def keys_through_front(pipe, name, hidden):
    """What the edited Linear reads, computed here from the transformer's own front module (not the pack's)."""
    tr = pipe.transformer
    with torch.no_grad():
        if name == "qwen":
            return tr.txt_norm(hidden)
        if name == "zimage":
            return tr.cap_embedder[0](hidden)
        if name == "lumina2":
            return tr.time_caption_embed.caption_embedder[0](hidden)
        if name == "wan":
            return tr.condition_embedder.text_embedder(hidden)
    return hidden


def raw_encoder(pipe):
    entry = dfam.DIFFUSERS_FAMILIES[type(pipe.transformer).__name__]
    return dfam.TemplatedPipelineEncoder(pipe, entry, entry.record.label)


def last_word_row(pipe, prompt):
    """The encoder row (before any norm / MLP) of the prompt's last word; checked against the token id the
    pipeline itself fed its text encoder at that row (read back by the pack from the encoder's input_ids)."""
    enc = raw_encoder(pipe).encode([prompt])
    i = int(enc.lengths[0]) - 2
    assert enc.token_ids[0][i] == pipe.tokenizer.convert_tokens_to_ids(prompt.split(" ")[-1])
    return enc.hidden[0, i]


# -- which layers, which family ----------------------------------------------------------------------


def test_the_edited_layers_are_the_family_records_under_diffusers_names(family):
    name, pipe = family
    params = api.projection_params(pipe)
    assert api.pipeline_family(pipe) == FAMILIES[name]
    assert sorted(n for n, _ in params.values()) == sorted(EDITED[name])
    record = dfam.DIFFUSERS_FAMILIES[type(pipe.transformer).__name__].record
    assert record.family == FAMILIES[name]
    if record.context_key in params:  # the record's canonical key is the edited Linear's
        assert params[record.context_key][0] == EDITED[name][0]


# -- the closed form's equations at the edited Linear -----------------------------------------------


def test_uce_maps_the_concept_key_to_the_guide_value_at_the_edited_linear(family):
    name, pipe = family
    before = state(pipe)
    cfg = UCEConfig(concepts=["a photo of cat"], anchors=["a photo of dog"], variant="2025", lam=1e-6, preserve=[])
    eraser = api.compute_eraser_for_pipeline(pipe, cfg)
    assert same(before, state(pipe)), "computing must not touch the model"
    c = keys_through_front(pipe, name, last_word_row(pipe, "a photo of cat")).double()
    g = keys_through_front(pipe, name, last_word_row(pipe, "a photo of dog")).double()
    for key, (param_name, param) in api.projection_params(pipe).items():
        w0 = param.detach().double()
        w1 = w0 + eraser.deltas[key].dense(torch.float64)
        target = w0 @ g
        assert torch.allclose(w1 @ c, target, atol=1e-5 * (1 + target.abs().max())), (name, param_name)


def test_the_pre_map_equals_the_transformers_own_front_module(family):
    name, pipe = family
    encoder = api.DiffusersTextEncoder(pipe)
    enc = encoder.encode(["a photo of cat"])
    inner = getattr(encoder, "_encoder", encoder)
    raw = inner.encode(["a photo of cat"]).hidden
    own = keys_through_front(pipe, name, raw).float()
    rows = min(own.shape[1], enc.hidden.shape[1])
    assert torch.allclose(enc.hidden[:, :rows], own[:, :rows], atol=1e-5)


def test_the_encoding_is_the_pipelines_own_rows(family):
    # hidden = exactly the rows encode_prompt hands the transformer (masked-out rows dropped)
    name, pipe = family
    entry = dfam.DIFFUSERS_FAMILIES[type(pipe.transformer).__name__]
    with torch.no_grad():
        embeds, mask = entry.encode(pipe, "a photo of cat", "cpu", entry.max_sequence_length)
    rows = embeds if mask is None else embeds[mask.bool()]
    enc = raw_encoder(pipe).encode(["a photo of cat"])
    assert enc.hidden.shape[1] == rows.shape[0] and torch.equal(enc.hidden[0], rows.float())
    ids = enc.token_ids[0]
    cat = pipe.tokenizer.convert_tokens_to_ids("cat")
    assert ids[enc.lengths[0] - 2] == cat and ids.count(cat) == 1
    if name == "lumina2":  # Gemma: a start token, no end token; the rows after the prompt are masked padding
        assert len(ids) == enc.lengths[0] - 1 and enc.has_bos
    else:  # the closing token (</s>, <|im_end|>) follows the last word
        assert ids[enc.lengths[0] - 1] in pipe.tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"])
    if name == "wan":  # UMT5 padded to 512 with zero rows, all of which the cross-attention reads
        assert enc.hidden.shape[1] == 512 and (enc.hidden[0, enc.lengths[0] :].abs().sum(-1) == 0).all()


def test_speed_moves_the_concept_at_its_layers(family):
    name, pipe = family
    cfg = SPEEDConfig(concepts=["a photo of cat"], anchors=["a photo of dog"])
    eraser = api.compute_eraser_for_pipeline(pipe, cfg)
    c = keys_through_front(pipe, name, last_word_row(pipe, "a photo of cat")).double()
    params = api.projection_params(pipe)
    assert eraser.deltas and set(eraser.deltas) <= set(params)  # SPEED edits V only where there are K and V
    for key, delta in eraser.deltas.items():
        param = params[key][1].detach()
        delta = delta.dense(torch.float64)
        assert (delta @ c).norm() > 1e-3 * (param.double() @ c).norm(), key


# -- apply / strength 0 / remove --------------------------------------------------------------------


def test_strength_zero_changes_nothing_and_remove_restores_bit_for_bit(family):
    name, pipe = family
    before = state(pipe)
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["cat"], anchors=["dog"]))
    handle = api.apply_eraser(pipe, eraser, strength=0.0)
    assert same(before, state(pipe))
    api.remove_eraser(pipe, handle)
    with api.erased(pipe, eraser, strength=1.0):
        after = state(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(EDITED[name])
    assert same(before, state(pipe))


#: the edited layers in ComfyUI's own key names (comfy/ldm/…), written out here independently of the pack's table
COMFY_KEYS = {
    "chroma": ["txt_in.weight"],
    "flux2": ["txt_in.weight"],
    "qwen": ["txt_in.weight"],
    "zimage": ["cap_embedder.1.weight"],
    "lumina2": ["cap_embedder.1.weight"],
    "wan": [f"blocks.{i}.cross_attn.{kv}.weight" for i in range(2) for kv in "kv"],
    "auraflow": ["cond_seq_linear.weight"],
}
#: a family whose file uses the same canonical key names, where there is one (the family check must refuse it)
WRONG = {
    "chroma": "flux2", "flux2": "chroma", "qwen": "chroma", "zimage": "lumina2", "lumina2": "zimage", "wan": "qwen",
    "auraflow": "chroma",
}  # fmt: skip


class StandIn:
    """A text encoder of the right width with random rows: what matters here is the file's keys and family."""

    family, context_length = "stand-in", 77

    def __init__(self, width):
        self.width = width

    def encode(self, prompts):
        from erasers.text import PromptEncoding

        rows = [torch.randn(6, self.width, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        n = len(prompts)
        return PromptEncoding(torch.stack(rows), torch.full((n,), 4), [[1, 2, 3, 4]] * n)


def comfy_file(name, pipe, tmp_path):
    """An eraser solved on a ComfyUI-layout state dict (ComfyUI's key names) and saved as Save Eraser does."""
    from erasers.edits.eraser import compute_eraser

    sd = pipe.transformer.state_dict()
    weights = {k: sd[d].clone() for k, d in zip(COMFY_KEYS[name], EDITED[name])}
    width = next(iter(weights.values())).shape[1]
    eraser = compute_eraser(UCEConfig(concepts=["cat"], anchors=["dog"]), StandIn(width), weights, FAMILIES[name])
    return api.save_eraser(eraser, tmp_path / f"{name}.safetensors")


def test_a_file_made_on_a_comfyui_model_of_the_family_applies_and_a_wrong_family_file_is_refused(family, tmp_path):
    name, pipe = family
    loaded = api.load_eraser(comfy_file(name, pipe, tmp_path), pipe)
    before = state(pipe)
    with api.erased(pipe, loaded):
        after = state(pipe)
        assert {k for k in before if not torch.equal(before[k], after[k])} == set(EDITED[name])
    assert same(before, state(pipe))
    other = WRONG[name]
    other_pipe = _CACHE.get(other) or _CACHE.setdefault(other, build(other))
    foreign = comfy_file(other, other_pipe, tmp_path)
    with pytest.raises(FamilyMismatch, match=f"made for {FAMILIES[other].label} but the model is"):
        api.load_eraser(foreign, pipe)
    with pytest.raises(FamilyMismatch):
        api.apply_eraser(pipe, api.load_eraser(foreign))
    assert same(before, state(pipe)) and getattr(pipe.transformer, api.HANDLE_ATTR, None) is None


@pytest.mark.parametrize("method", ["rece", "mace"])
def test_rece_and_mace_solve_finite_edits_that_move_the_concept(family, method):
    from erasers.edits.methods import get_method

    name, pipe = family
    cfg = get_method(method).config_class(concepts=["cat"], anchors=["dog"])
    eraser = api.compute_eraser_for_pipeline(pipe, cfg)
    c = keys_through_front(pipe, name, last_word_row(pipe, "cat")).double()
    params = api.projection_params(pipe)
    assert eraser.deltas
    for key, delta in eraser.deltas.items():
        assert delta.is_finite()
        assert (delta.dense(torch.float64) @ c).norm() > 1e-4 * (params[key][1].double() @ c).norm(), key


def test_a_non_finite_result_is_refused_and_leaves_the_model_unchanged(family):
    name, pipe = family
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["cat"], anchors=["dog"]))
    before = state(pipe)
    with pytest.raises(NonFiniteResult, match="nothing was changed"):
        api.apply_eraser(pipe, eraser, strength=1e300)
    assert same(before, state(pipe))
    assert getattr(pipe.transformer, api.HANDLE_ATTR, None) is None


# -- refusals ---------------------------------------------------------------------------------------


def test_a_too_long_concept_is_refused_not_cut():
    pipe = _CACHE.get("chroma") or _CACHE.setdefault("chroma", build("chroma"))
    with pytest.raises(ConceptTooLong):
        api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=[" ".join(["cat"] * 600)], anchors=["dog"]))


def test_another_pipeline_class_with_the_same_transformer_is_refused_by_name():
    pipe = _CACHE.get("qwen") or _CACHE.setdefault("qwen", build("qwen"))

    class QwenImageEditPipeline:  # a pipeline that conditions on images too
        transformer = pipe.transformer
        text_encoder = pipe.text_encoder
        encode_prompt = pipe.encode_prompt

    with pytest.raises(UnsupportedFamily, match="QwenImageEditPipeline holds a Qwen-Image transformer"):
        api.compute_eraser_for_pipeline(QwenImageEditPipeline(), UCEConfig(concepts=["cat"]))


def test_wan_variants_are_refused_by_name():
    pipe = _CACHE.get("wan") or _CACHE.setdefault("wan", build("wan"))
    two = diffusers.WanPipeline(pipe.tokenizer, pipe.text_encoder, None, SCHED(), pipe.transformer, pipe.transformer)
    with pytest.raises(UnsupportedFamily, match="second expert"):
        api.compute_eraser_for_pipeline(two, UCEConfig(concepts=["cat"]))
    i2v = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, image_dim=8, added_kv_proj_dim=16,
    )  # fmt: skip
    with pytest.raises(UnsupportedFamily, match="image-to-video"):
        api.pipeline_family(diffusers.WanPipeline(pipe.tokenizer, pipe.text_encoder, None, SCHED(), i2v))


def test_every_front_module_of_the_records_is_found_under_diffusers_names(family):
    from erasers.families.key_map import pre_keys

    name, pipe = family
    entry = dfam.DIFFUSERS_FAMILIES[type(pipe.transformer).__name__]
    names = entry.names([n for n, _ in pipe.transformer.named_parameters()])
    front = [k for k in pre_keys(entry.record.pre) if k.endswith(".weight")]
    if name in ("chroma", "auraflow"):  # T5 / Pile-T5 straight into txt_in / cond_seq_linear
        assert entry.record.pre is None and front == []
    elif name == "flux2":  # ComfyUI's txt_norm exists only in checkpoints that have it; diffusers' Flux.2 has none
        assert front == ["txt_norm.weight"] and "txt_norm.weight" not in names
    else:
        assert front and all(k in names for k in front), (name, front, names)


def test_the_cli_erases_on_a_saved_pipeline_folder_of_a_new_family(tmp_path, capsys):
    # `python -m erasers erase --diffusers DIR`: DiffusionPipeline.from_pretrained picks ZImagePipeline from
    # model_index.json, and the family comes from its transformer class. (Wan / Chroma folders need
    # `accelerate` to load UMT5 / T5, which keep layers in float32; it is not installed here.)
    from erasers_diffusers.cli import main

    pipe = build("zimage")
    pipe.register_modules(
        vae=diffusers.AutoencoderKL(
            block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            latent_channels=4, norm_num_groups=4, layers_per_block=1,
        )
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "zimage")
    out = tmp_path / "z.safetensors"
    assert (
        main(
            [
                "erase",
                "--diffusers",
                str(tmp_path / "zimage"),
                "--concept",
                "cat",
                "--anchor",
                "dog",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "uce eraser for Z-Image" in capsys.readouterr().out
    eraser = api.load_eraser(out, pipe)
    assert eraser.family == Family.ZIMAGE and sorted(eraser.deltas) == ["cap_embedder.1.weight"]
    before = state(pipe)
    with api.erased(pipe, eraser):
        assert not torch.equal(before["cap_embedder.1.weight"], pipe.transformer.state_dict()["cap_embedder.1.weight"])
    assert same(before, state(pipe))
