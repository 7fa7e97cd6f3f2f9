"""ComfyUI glue without ComfyUI: rates per batch row from cond_or_uncond, the wrapper's hooks, texts."""

import copy

import torch
from pack_import import pack_module  # nodes/ import the core as ``<pack>.erasers``: one class identity

from erasers_dev.testing import ToyTextEncoder

LowRankDelta = pack_module("erasers.lowrank").LowRankDelta
_spm = pack_module("erasers.membranes.spm")
GATE_FT, Gate, Membrane = _spm.GATE_FT, _spm.Gate, _spm.Membrane
permeability = pack_module("erasers.membranes.transport").permeability
_runtime = pack_module("nodes.spm_runtime")
MEMBRANES_KEY, MembraneSet = _runtime.MEMBRANES_KEY, _runtime.MembraneSet
diffusion_model_wrapper, prompt_texts = _runtime.diffusion_model_wrapper, _runtime.prompt_texts

IN, OUT = 8, 4


class ToyEncoder(ToyTextEncoder):
    def conditioning(self, prompt):
        return self.encode([prompt]).hidden[0]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=False)

    def forward(self, x, timesteps, context, y, control, transformer_options):
        return self.proj(context)


class Executor:
    def __init__(self, model):
        self.class_obj = model

    def __call__(self, *args, **kw):
        return self.class_obj(*args, **kw)


def setup():
    enc = ToyEncoder(dim=IN, context_length=6)
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta(torch.randn(OUT, 1, generator=g), torch.randn(1, IN, generator=g))
    mem = Membrane({"proj.weight": delta}, Gate(GATE_FT, ["snoopy"]))
    texts = ["a photo of snoopy", "a bowl of soup"]
    mset = MembraneSet().with_entry(mem, enc, texts, "official")
    return enc, delta, mset


def test_prompt_texts_reads_literal_text_inputs():
    graph = {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0]}},
        "3": {"class_type": "X", "inputs": {"text_g": "big", "seed": 3}},
    }
    assert prompt_texts(graph) == ["a cat", "big"]


def test_set_is_not_deep_copied_and_chaining_does_not_mutate():
    _, _, mset = setup()
    assert copy.deepcopy({"k": mset})["k"] is mset
    longer = mset.with_entry(mset.entries[0][0], None, (), "linear")
    assert len(mset.entries) == 1 and len(longer.entries) == 2 and longer.combination == "linear"


def test_each_item_takes_its_positive_rate_on_both_branches():
    enc, delta, mset = setup()
    pos = enc.encode(["a photo of snoopy", "a bowl of soup"]).hidden
    mset.prepare([pos[0:1], pos[1:2]])
    neg = enc.encode(["", ""]).hidden
    context = torch.cat([neg, pos])  # cond_or_uncond [1, 0]: uncond chunk first
    rates = mset.row_rates(context, [1, 0])
    m = permeability(enc.encode(["a photo of snoopy", "a bowl of soup"]), enc.encode(["snoopy"]))[:, 0].float()
    torch.testing.assert_close(rates[:, 0], torch.cat([m, m]))
    assert rates[0, 0] == 1.0  # 'snoopy' token present → fully open


def test_wrapper_adds_the_gated_delta_and_leaves_no_hook_behind():
    enc, delta, mset = setup()
    net = Net()
    pos = enc.encode(["a bowl of soup"]).hidden
    mset.prepare([pos])
    context = torch.cat([enc.encode([""]).hidden, pos])
    base = net.proj(context)
    out = diffusion_model_wrapper(
        Executor(net), None, None, context, None, None, {MEMBRANES_KEY: mset, "cond_or_uncond": [1, 0]}
    )
    m = permeability(enc.encode(["a bowl of soup"]), enc.encode(["snoopy"]))[0, 0].item()
    torch.testing.assert_close(out - base, m * m * context @ delta.dense().T, rtol=1e-4, atol=1e-5)
    assert torch.equal(net.proj(context), base)
    assert not net.proj._forward_hooks
