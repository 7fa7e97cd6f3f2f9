"""The SPM / ESD-x trainer (erasers_dev/spm_train.py) on a tiny random shapes model: fresh adapters are the
identity, training moves only the adapters, removing them restores the UNet bit for bit, and the saved file
is read back by the pack's format detection (SPM layout for membranes, kohya for LoRAs) with every layer
matched and the same ΔW."""

import pytest
import torch

from erasers.config import ConfigError
from erasers_dev import spm_train as T
from erasers_dev.shapes import model as shapes_model
from erasers_diffusers.apply import load_for_unet


@pytest.fixture()
def tiny():
    cfg = shapes_model.tiny_config()
    pipe = shapes_model.random_pipeline(0, cfg)
    pipe.unet.eval()
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe


def _eps(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=pipe.encode_prompts(["a red circle", "a blue square"])).sample


def test_erase_target_is_negative_guidance():
    pos, neu = torch.tensor([3.0]), torch.tensor([1.0])
    assert torch.equal(T.erase_target(pos, neu, 1.0), torch.tensor([-1.0]))  # ε_neu − η(ε_pos − ε_neu)
    assert torch.equal(T.erase_target(pos, neu, 0.0), neu)


def test_config_refuses_bad_input():
    with pytest.raises(ConfigError, match="target"):
        T.SPMTrainConfig(targets=[])
    with pytest.raises(ConfigError, match="anchor"):
        T.SPMTrainConfig(targets=["circle"], action="erase_with_la", anchors=[])
    with pytest.raises(ConfigError, match="neutral"):
        T.SPMTrainConfig(targets=["a", "b", "c"], neutrals=["x", "y"], action="erase")
    with pytest.raises(ConfigError, match="layers"):
        T.SPMTrainConfig(targets=["circle"], action="erase", layers="everything")


@pytest.mark.parametrize("kind,layers_per_transformer,fmt", [("spm", 12, "spm"), ("esd-x", 2, "kohya")])
def test_train_save_and_read_back(tiny, tmp_path, kind, layers_per_transformer, fmt):
    pipe = tiny
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    eps0 = _eps(pipe)
    config = T.shapes_config("circle", kind, iterations=2, rollout_steps=3, batch_size=2, anchor_batch=2, lr=1e-2)
    adapters = T.Adapters(pipe.unet, config.layers, config.rank, config.alpha)
    n_transformers = sum(
        1 for n, _ in pipe.unet.named_modules() if n.endswith(tuple(f"attentions.{i}" for i in range(4)))
    )
    assert len(adapters.adapters) == layers_per_transformer * n_transformers
    assert torch.equal(_eps(pipe), eps0)  # up = 0: a fresh adapter is the identity
    adapters.remove()

    adapters = T.train(pipe, config)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # UNet frozen
    trained = _eps(pipe)
    assert not torch.equal(trained, eps0)
    path = T.save(adapters, config, str(tmp_path / f"{kind}.safetensors"))
    adapters.remove()
    assert torch.equal(_eps(pipe), eps0)  # hooks off: bit for bit

    deltas, report = load_for_unet(pipe.unet, path)
    assert report.format == fmt and not report.unmatched and len(deltas) == len(adapters.adapters)
    if fmt == "spm":
        assert report.concepts == ["circle"]
    from erasers_diffusers.apply import DiffusersMembranes, membrane_from_file

    membrane, _ = membrane_from_file(pipe.unet, path, transport=False, kind="lora")
    with DiffusersMembranes(pipe, loras=[membrane]):
        torch.testing.assert_close(_eps(pipe), trained, atol=1e-5, rtol=1e-4)
