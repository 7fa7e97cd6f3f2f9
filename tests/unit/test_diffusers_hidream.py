"""HiDream-I1 through the diffusers API (#16): ``HiDreamImagePipeline`` with tiny random modules, no downloads.

The pipeline is diffusers 0.42's own class: the transformer from its config (1 double + 2 single blocks, Llama
layers [0, 1, 1] so two projections share a stream), CLIP-L / CLIP-G from ``CLIPTextModelWithProjection``,
T5 from ``T5EncoderModel``, Llama from ``LlamaForCausalLM`` (2 layers), every tokenizer a
``PreTrainedTokenizerFast`` over a word-level vocabulary with the real special-token layout (CLIP's start / end,
T5's </s>, Llama's start token and its end token as padding — the pipeline sets that). Every prompt goes through
the pipeline's own ``encode_prompt``.

Checked: each caption projection is solved with the rows of the stream it reads (UCE's equation per
projection, with the key rows taken independently from ``encode_prompt`` and the token ids the tokenizers give),
the pooled embedder with the pooled CLIP vector; the encoder rows are the pipeline's own (the start token's Llama
row kept, as diffusers feeds it); strength 0 changes nothing, remove restores bit for bit; a single-encoder
request and another pipeline class are refused by name.
"""

from __future__ import annotations

import pytest

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.errors import UnsupportedFamily  # noqa: E402
from erasers.files.families import Family  # noqa: E402
from erasers_diffusers import api  # noqa: E402

WORDS = "a photo of cat dog van gogh painting red blue x".split()
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "</s>", "<|begin_of_text|>", "<|eot_id|>"]
VOCAB = {t: i for i, t in enumerate(["<pad>"] + SPECIALS + WORDS + ["<unk>"])}
T5_WIDTH, LLAMA_WIDTH, CLIP_PROJECTION = 16, 24, 8
LLAMA_LAYERS = [0, 1, 1]


def tokenizer(bos=None, eos=None, pad="<pad>", append_eos=True):
    """Llama 3 (``append_eos=False``): the start token only; its end token is declared (the pipeline pads with it)."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    end = eos if append_eos else None
    single = " ".join(([bos] if bos else []) + ["$A"] + ([end] if end else []))
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, VOCAB[t]) for t in (bos, end) if t]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=pad, unk_token="<unk>", bos_token=bos, eos_token=eos
    )


def clip():
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=CLIP_PROJECTION, max_position_embeddings=128, eos_token_id=VOCAB["<|endoftext|>"],
        bos_token_id=VOCAB["<|startoftext|>"], pad_token_id=0,
    )  # fmt: skip
    return transformers.CLIPTextModelWithProjection(cfg).eval()


def build():
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=len(VOCAB), d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).eval()
    llama_cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=LLAMA_WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, attn_implementation="eager",
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(llama_cfg).eval()
    transformer = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[T5_WIDTH, LLAMA_WIDTH], text_emb_dim=2 * CLIP_PROJECTION,
        num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(16, 16),
        llama_layers=LLAMA_LAYERS,
    )  # fmt: skip
    return diffusers.HiDreamImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=clip(),
        tokenizer=tokenizer("<|startoftext|>", "<|endoftext|>"),
        text_encoder_2=clip(),
        tokenizer_2=tokenizer("<|startoftext|>", "<|endoftext|>"),
        text_encoder_3=t5,
        tokenizer_3=tokenizer(eos="</s>"),
        text_encoder_4=llama,
        tokenizer_4=tokenizer(bos="<|begin_of_text|>", eos="<|eot_id|>", append_eos=False),
        transformer=transformer,
    )


@pytest.fixture(scope="module")
def pipe():
    return build()


def state(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


PROJECTIONS = [f"caption_projection.{i}.linear.weight" for i in range(len(LLAMA_LAYERS) + 1)]
POOLED = "p_embedder.pooled_embedder.linear_1.weight"


def last_word_keys(pipe, prompt):
    """{canonical key: the row that Linear reads for the prompt's last word}, from encode_prompt and the
    tokenizers' own ids (T5: no start token, the row before </s>; Llama: the start token's row kept, so the
    word's row is its token position), and the pooled vector for the pooled embedder."""
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(
            prompt=[prompt], device="cpu", do_classifier_free_guidance=False, max_sequence_length=128
        )
    t5_ids = pipe.tokenizer_3(prompt)["input_ids"]
    llama_ids = pipe.tokenizer_4(prompt)["input_ids"]
    word = VOCAB[prompt.split()[-1]]
    assert t5_ids[-2] == word and llama_ids[-1] == word and llama_ids[0] == VOCAB["<|begin_of_text|>"]
    out = {
        f"caption_projection.{i}.linear.weight": llama[layer, 0, len(llama_ids) - 1]
        for i, layer in enumerate(LLAMA_LAYERS)
    }
    out[PROJECTIONS[-1]] = t5[0, len(t5_ids) - 2]
    out[POOLED] = pooled[0]
    return {k: v.double() for k, v in out.items()}


def test_the_family_and_the_edited_layers(pipe):
    assert api.pipeline_family(pipe) == Family.HIDREAM
    assert sorted(api.projection_params(pipe)) == sorted(PROJECTIONS + [POOLED])
    with pytest.raises(UnsupportedFamily, match="different text streams.*compute_eraser_for_pipeline"):
        api.DiffusersTextEncoder(pipe)


def test_uce_solves_every_projection_with_the_rows_of_its_own_stream(pipe):
    before = state(pipe)
    cfg = UCEConfig(concepts=["a photo of cat"], anchors=["a photo of dog"], variant="2025", lam=1e-6, preserve=[])
    eraser = api.compute_eraser_for_pipeline(pipe, cfg)
    assert same(before, state(pipe)), "computing must not touch the model"
    assert eraser.timings["streams"] == 3  # T5, Llama 0, Llama 1 (projections 1 and 2 share it)
    c, g = last_word_keys(pipe, "a photo of cat"), last_word_keys(pipe, "a photo of dog")
    params = api.projection_params(pipe)
    assert set(eraser.deltas) == set(params)
    for key, (name, param) in params.items():
        w0 = param.detach().double()
        w1 = w0 + eraser.deltas[key].dense(torch.float64)
        target = w0 @ g[key]
        assert torch.allclose(w1 @ c[key], target, atol=1e-5 * (1 + target.abs().max())), name
        other = next(k for k in c if k != key and c[k].shape == c[key].shape and not torch.equal(c[k], c[key]))
        # another stream's row is not what this projection was solved on
        assert not torch.allclose(w1 @ c[other], w0 @ g[other], atol=1e-3), (name, other)


def test_strength_zero_changes_nothing_and_remove_restores_bit_for_bit(pipe):
    before = state(pipe)
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["cat"], anchors=["dog"]))
    handle = api.apply_eraser(pipe, eraser, strength=0.0)
    assert same(before, state(pipe))
    api.remove_eraser(pipe, handle)
    with api.erased(pipe, eraser, strength=1.0):
        after = state(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(PROJECTIONS + [POOLED])
    assert same(before, state(pipe))


def test_each_prompt_is_encoded_once_for_every_stream(pipe, monkeypatch):
    calls = []
    original = type(pipe).encode_prompt
    monkeypatch.setattr(
        type(pipe), "encode_prompt", lambda self, **kw: calls.append(kw["prompt"]) or original(self, **kw)
    )
    api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["cat"], anchors=["dog"], preserve=["red"]))
    assert len(calls) == len({tuple(c) for c in calls}), "a prompt was encoded more than once"


def test_another_pipeline_class_with_the_hidream_transformer_is_refused_by_name(pipe):
    class Other(diffusers.HiDreamImagePipeline):
        pass

    other = Other(**{k: getattr(pipe, k) for k in pipe.components})
    with pytest.raises(UnsupportedFamily, match="Other holds a HiDream-I1 transformer.*HiDreamImagePipeline"):
        api.compute_eraser_for_pipeline(other, UCEConfig(concepts=["cat"]))
