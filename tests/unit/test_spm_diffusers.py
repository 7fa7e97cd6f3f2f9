"""Membranes on a tiny diffusers UNet: merged-weight equivalence, per-prompt rates, exact removal."""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")

from erasers.membranes.spm import GATE_FT, Gate  # noqa: E402
from erasers.membranes.transport import permeability  # noqa: E402
from erasers_dev.testing import ToyTextEncoder  # noqa: E402
from erasers_diffusers.apply import DiffusersMembranes, membrane_from_file, unet_canonical_names  # noqa: E402

TARGET = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|"
    r"ff\.net\.0\.proj|ff\.net\.2))$"
)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def write_membrane(unet, path, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in unet.named_modules():
        if TARGET.search(name):
            w = mod.weight
            tail = tuple(w.shape[2:])
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[stem + ".lora_down.weight"] = scale * torch.randn((1, w.shape[1]) + tail, generator=g)
            tensors[stem + ".lora_up.weight"] = scale * torch.randn((w.shape[0], 1) + tail, generator=g)
            tensors[stem + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"prompts": "snoopy", "rank": "1", "alpha": "1.0"})
    return tensors


def run(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 16, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


def test_canonical_names_cover_the_unet():
    unet = tiny_unet()
    names = unet_canonical_names(unet)
    assert len(names) == len(dict(unet.named_parameters()))
    assert len(set(names.values())) == len(names)


def test_always_open_membrane_equals_merged_weights_and_removes_exactly(tmp_path):
    unet = tiny_unet()
    tensors = write_membrane(unet, tmp_path / "m.safetensors")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    base = run(unet)
    mem, report = membrane_from_file(unet, str(tmp_path / "m.safetensors"), strength=1.0, transport=False)
    assert not report.unmatched and report.concepts == ["snoopy"]
    merged = copy.deepcopy(unet)
    for name, mod in merged.named_modules():
        stem = "lora_unet_" + name.replace(".", "_")
        if stem + ".lora_up.weight" in tensors:
            up, down = tensors[stem + ".lora_up.weight"], tensors[stem + ".lora_down.weight"]
            mod.weight.data += (up.flatten(1) @ down.flatten(1)).reshape(mod.weight.shape)
    handle = DiffusersMembranes(SimpleNamespace(unet=unet), [mem])
    out = run(unet)
    torch.testing.assert_close(out, run(merged), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, base, atol=1e-3)
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run(unet), base)


def test_strength_zero_is_identity(tmp_path):
    unet = tiny_unet()
    write_membrane(unet, tmp_path / "m.safetensors")
    base = run(unet)
    mem, _ = membrane_from_file(unet, str(tmp_path / "m.safetensors"), strength=0.0, transport=False)
    with DiffusersMembranes(SimpleNamespace(unet=unet), [mem]):
        assert torch.equal(run(unet), base)


def test_transport_gives_each_prompt_its_rate_on_both_cfg_halves(tmp_path):
    unet = tiny_unet()
    write_membrane(unet, tmp_path / "m.safetensors")
    enc = ToyTextEncoder(dim=16, context_length=5)
    mem, _ = membrane_from_file(unet, str(tmp_path / "m.safetensors"))
    assert mem.gate == Gate(GATE_FT, ["snoopy"])
    prompts = ["a photo of snoopy", "a bowl of soup"]
    m = permeability(enc.encode(prompts), enc.encode(["snoopy"]))[:, 0].float()
    with DiffusersMembranes(SimpleNamespace(unet=unet), [mem], encoder=enc) as handle:
        rates = handle.set_prompts(prompts)
        torch.testing.assert_close(rates[:, 0], m)
        run(unet, batch=4)  # CFG layout: [uncond p0, uncond p1, cond p0, cond p1]
        hooks = handle.groups[0][1]
        torch.testing.assert_close(hooks.rates[:, 0], torch.cat([m, m]))
