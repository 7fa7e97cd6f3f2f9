"""The shapes text-to-image model: causal text encoder, TextEncoder adapter, pipeline, shipped weights."""

import json

import pytest
import torch

from erasers.text import PromptEncoding, TextEncoder, check_fits
from erasers_dev.shapes import model as shapes_model
from erasers_dev.shapes.text_encoder import ShapesTextEncoder, TextEncoderConfig
from erasers_dev.shapes.tokenizer import ShapesTokenizer


@pytest.fixture(scope="module")
def tiny_pipe():
    tok = ShapesTokenizer.default()
    cfg = shapes_model.ShapesModelConfig(
        unet=shapes_model.UNetConfig(
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=tok.vocab_size, context_length=tok.context_length, width=32, layers=2, heads=2
        ),
    )
    return shapes_model.random_pipeline(0, cfg)


def test_text_encoder_is_causal():
    torch.manual_seed(0)
    enc = ShapesTextEncoder(TextEncoderConfig(vocab_size=20, context_length=8, width=32, layers=2, heads=2)).eval()
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 3] = 9
    with torch.no_grad():
        h1, _ = enc(ids, torch.tensor([5]))
        h2, _ = enc(changed, torch.tensor([5]))
    torch.testing.assert_close(h1[:, :3], h2[:, :3])
    assert not torch.allclose(h1[:, 3:], h2[:, 3:])


def test_adapter_satisfies_text_encoder_protocol(tiny_pipe):
    adapter = tiny_pipe.text_encoder_adapter()
    assert isinstance(adapter, TextEncoder)
    assert adapter.family == "shapes" and adapter.context_length == 16
    prompts = ["a red circle", "", "a striped blue square on a white background"]
    enc = adapter.encode(prompts)
    assert isinstance(enc, PromptEncoding) and len(enc) == 3
    assert enc.hidden.dtype == torch.float32 and enc.hidden.device.type == "cpu"
    assert enc.hidden.shape == (3, 16, 32) and enc.pooled.shape == (3, 32)
    assert enc.lengths.tolist() == [5, 2, 10]
    assert [len(ids) for ids in enc.token_ids] == [5, 2, 10]
    tok = tiny_pipe.tokenizer
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in enc.token_ids)
    assert enc.has_bos and enc.last_subject_index.tolist() == [3, 0, 8]
    # the pooled vector is the EOS hidden state
    torch.testing.assert_close(enc.pooled[0], enc.hidden[0, 4])
    check_fits(enc, prompts, adapter.context_length)


def test_adapter_reports_untruncated_ids_so_long_prompts_are_refused(tiny_pipe):
    from erasers.errors import ConceptTooLong

    adapter = tiny_pipe.text_encoder_adapter()
    long_prompt = " ".join(["red"] * 20)
    enc = adapter.encode([long_prompt])
    assert enc.lengths.tolist() == [16] and len(enc.token_ids[0]) == 22
    with pytest.raises(ConceptTooLong):
        check_fits(enc, [long_prompt], adapter.context_length)


def test_pipeline_runs_two_steps_and_is_seeded(tiny_pipe):
    a = tiny_pipe(["a red circle", "a blue square"], steps=2, guidance=3.0, seed=1)
    b = tiny_pipe(["a red circle", "a blue square"], steps=2, guidance=3.0, seed=1)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    embeds = tiny_pipe.encode_prompts(["a red circle", "a blue square"])
    c = tiny_pipe(["x", "y"], steps=2, guidance=3.0, seed=1, prompt_embeds=embeds)
    torch.testing.assert_close(a, c)
    assert shapes_model.to_pil_grid(a, nrow=2).size[0] > 0


def test_every_cross_attention_reads_the_text_encoder_width(tiny_pipe):
    names = [n for n, _ in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")]
    assert names
    for name in names:
        assert tiny_pipe.unet.get_submodule(name).in_features == tiny_pipe.text_encoder.config.width


def test_save_load_roundtrip_and_wrong_file(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t2i.safetensors"
    shapes_model.save_pipeline(tiny_pipe, path, dtype=torch.float32)
    loaded = shapes_model.load_pipeline(path)
    torch.testing.assert_close(loaded(["a red circle"], steps=2, seed=0), tiny_pipe(["a red circle"], steps=2, seed=0))
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="is not a 'concept-erasers/shapes-t2i' file"):
        shapes_model.load_pipeline(bad)


shipped = pytest.mark.skipif(not shapes_model.DEFAULT_T2I.is_file(), reason="shipped weights not present")


@shipped
def test_shipped_weights_reproduce_the_reported_base_fidelity():
    """A small fixed-seed evaluation lands near the figure recorded in the weight file at training time."""
    from erasers_dev.shapes.classifier import load_classifier
    from erasers_dev.shapes.evaluate import evaluate

    pipe = shapes_model.load_default()
    reported = pipe.extra["fidelity"]
    result = evaluate(
        pipe,
        load_classifier(),
        per_prompt=2,
        steps=reported["steps"],
        guidance=reported["guidance"],
        seed=123,
        paraphrases=False,
    )
    got = result["canonical"]
    # 40 samples against the recorded 160: allow ~2.5 standard errors either way
    assert abs(got["shape_accuracy"] - reported["shape_accuracy"]) <= 0.2, result["markdown"]
    assert abs(got["colour_accuracy"] - reported["colour_accuracy"]) <= 0.2, result["markdown"]
    assert got["colour_accuracy"] >= 0.8, result["markdown"]


@shipped
def test_shipped_files_are_small_and_self_describing():
    from safetensors import safe_open

    from erasers_dev.shapes.classifier import DEFAULT_CLASSIFIER

    total = shapes_model.DEFAULT_T2I.stat().st_size + DEFAULT_CLASSIFIER.stat().st_size
    assert total <= 20e6
    with safe_open(str(shapes_model.DEFAULT_T2I), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == shapes_model.FORMAT_T2I
    assert json.loads(meta["unet_config"])["sample_size"] == 16
