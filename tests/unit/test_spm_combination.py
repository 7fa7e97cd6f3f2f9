"""The official combination (m², cross terms), the linear one, and the per-item runtime forward."""

import pytest
import torch

from erasers.errors import EraserError
from erasers.lowrank import LowRankDelta
from erasers.membranes.hooks import MembraneHooks
from erasers.membranes.spm import (
    GATE_FT,
    CombinationError,
    Gate,
    Membrane,
    RateCache,
    build_stacks,
    delta_linear,
    delta_official,
    membrane_forward,
)
from erasers.membranes.transport import permeability
from erasers_dev.testing import ToyTextEncoder

KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
OUT, IN = 6, 5


def factors(seed, rank=1):
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(OUT, rank, generator=g), torch.randn(rank, IN, generator=g))


def stacks(mems, combination):
    return build_stacks(mems, combination, {KEY: (OUT, IN)})["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]


def run(mems, combination, rates, x):
    y = torch.zeros(x.shape[0], x.shape[1], OUT, dtype=torch.float64)
    return membrane_forward(x, y, stacks(mems, combination), torch.tensor(rates, dtype=torch.float64))


def test_official_single_membrane_acts_at_m_squared():
    f = factors(0)
    x = torch.randn(1, 3, IN, dtype=torch.float64)
    m = 0.6
    out = run([Membrane({KEY: f})], "official", [[m]], x)
    torch.testing.assert_close(out, x @ (m * m * f.dense(torch.float64)).T)
    torch.testing.assert_close(delta_official([f], [m]), m * m * f.dense())


def test_official_two_membranes_produce_the_cross_terms():
    f1, f2 = factors(1), factors(2)
    m1, m2 = 0.3, 0.9
    x = torch.randn(1, 4, IN, dtype=torch.float64)
    out = run([Membrane({KEY: f1}), Membrane({KEY: f2})], "official", [[m1, m2]], x)
    u1, d1, u2, d2 = f1.up.double(), f1.down.double(), f2.up.double(), f2.down.double()
    expanded = m1 * m1 * u1 @ d1 + m2 * m2 * u2 @ d2 + m1 * m2 * (u1 @ d2 + u2 @ d1)
    torch.testing.assert_close(out, x @ expanded.T)
    cross = m1 * m2 * (u1 @ d2 + u2 @ d1)
    lin_sq = m1 * m1 * u1 @ d1 + m2 * m2 * u2 @ d2
    torch.testing.assert_close(delta_official([f1, f2], [m1, m2]).double(), lin_sq + cross, rtol=1e-5, atol=1e-5)
    assert cross.abs().max() > 1e-3  # the cross terms are really there


def test_linear_mode_is_linear():
    f1, f2 = factors(3, rank=2), factors(4)
    mems = [Membrane({KEY: f1}), Membrane({KEY: f2})]
    x = torch.randn(1, 2, IN, dtype=torch.float64)
    a = run(mems, "linear", [[0.5, 0.0]], x)
    b = run(mems, "linear", [[0.0, 0.25]], x)
    ab = run(mems, "linear", [[0.5, 0.25]], x)
    torch.testing.assert_close(ab, a + b)
    torch.testing.assert_close(run(mems, "linear", [[1.0, 0.5]], x), 2 * ab)
    torch.testing.assert_close(ab, x @ delta_linear([f1, f2], [0.5, 0.25]).double().T, rtol=1e-5, atol=1e-5)


def test_each_batch_item_gets_its_own_rate():
    f1, f2 = factors(5), factors(6)
    mems = [Membrane({KEY: f1}), Membrane({KEY: f2})]
    x = torch.randn(3, 2, IN, dtype=torch.float64)
    rates = [[0.1, 0.9], [1.0, 0.0], [0.5, 0.5]]
    for mode in ("official", "linear"):
        together = run(mems, mode, rates, x)
        for b in range(3):
            torch.testing.assert_close(together[b : b + 1], run(mems, mode, [rates[b]], x[b : b + 1]))


def test_official_needs_equal_ranks():
    with pytest.raises(CombinationError, match="linear"):
        stacks([Membrane({KEY: factors(0, 1)}), Membrane({KEY: factors(1, 2)})], "official")


def test_unknown_combination_refused():
    with pytest.raises(EraserError):
        stacks([Membrane({KEY: factors(0)})], "sum")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, bias=False)
        self.conv = torch.nn.Conv2d(IN, OUT, 1, bias=False)


def test_hooks_zero_rates_are_identity_and_removal_is_exact():
    torch.manual_seed(0)
    net = Tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    shapes = {"proj.weight": (OUT, IN), "conv.weight": (OUT, IN, 1, 1)}
    mem = Membrane({"proj.weight": factors(7), "conv.weight": factors(8)})
    x, xc = torch.randn(2, 3, IN), torch.randn(2, IN, 4, 4)
    base, basec = net.proj(x), net.conv(xc)
    hooks = MembraneHooks(net, build_stacks([mem], "official", shapes))
    assert torch.equal(net.proj(x), base) and torch.equal(net.conv(xc), basec)  # no rates set yet: shut
    hooks.rates = torch.zeros(2, 1)
    assert torch.equal(net.proj(x), base) and torch.equal(net.conv(xc), basec)
    hooks.rates = torch.tensor([[1.0], [0.5]])
    out = net.proj(x)
    torch.testing.assert_close(out[0], base[0] + x[0] @ factors(7).dense().T)
    torch.testing.assert_close(out[1], base[1] + 0.25 * x[1] @ factors(7).dense().T)
    w = net.conv.weight + factors(8).dense().reshape(OUT, IN, 1, 1)
    torch.testing.assert_close(net.conv(xc)[:1], torch.nn.functional.conv2d(xc[:1], w), rtol=1e-5, atol=1e-5)
    hooks.remove()
    assert torch.equal(net.proj(x), base)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_unrelated_prompt_contribution_equals_the_formula():
    encoder = ToyTextEncoder(dim=IN, context_length=6)
    f = factors(9)
    mem = Membrane({KEY: f}, Gate(GATE_FT, ["snoopy"]))
    rate = RateCache([mem], encoder).rates(["a bowl of soup"])
    m = permeability(encoder.encode(["a bowl of soup"]), encoder.encode(["snoopy"]))[0, 0].item()
    assert 0 < m < 1
    x = torch.randn(1, 3, IN, dtype=torch.float64)
    out = membrane_forward(x, torch.zeros(1, 3, OUT, dtype=torch.float64), stacks([mem], "official"), rate)
    torch.testing.assert_close(out, m * m * x @ f.dense(torch.float64).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["official", "linear"])
@pytest.mark.parametrize("channels_first", [False, True])
def test_in_place_inference_path_equals_the_autograd_path(mode, channels_first):
    mems = [Membrane({KEY: factors(11)}), Membrane({KEY: factors(12)})]
    stack = stacks(mems, mode)
    rates = torch.tensor([[0.3, 0.7], [1.0, 0.2]])
    x = torch.randn(2, IN, 3, 3) if channels_first else torch.randn(2, 9, IN)
    y = torch.randn(2, OUT, 3, 3) if channels_first else torch.randn(2, 9, OUT)
    expected = membrane_forward(x, y, stack, rates, channels_first)
    assert not torch.equal(expected, y)
    with torch.no_grad():
        y2 = y.clone()
        got = membrane_forward(x, y2, stack, rates, channels_first)
    torch.testing.assert_close(got, expected)
    xl = x.movedim(1, -1) if channels_first else x
    direct = torch.stack(
        [
            xl[b]
            @ (delta_official if mode == "official" else delta_linear)([factors(11), factors(12)], rates[b].tolist()).T
            for b in range(2)
        ]
    )
    torch.testing.assert_close(got, y + (direct.movedim(-1, 1) if channels_first else direct), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["official", "linear"])
def test_one_prompt_batch_runs_on_the_folded_weight_and_restores_it(mode):
    """Uniform rates and many tokens: the call runs on W + ΔW(m) (same result as the low-rank path), the
    host's weight object comes back untouched, also when the forward raises."""
    torch.manual_seed(1)
    net = Tiny()
    weights = {n: p for n, p in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    shapes = {"proj.weight": (OUT, IN), "conv.weight": (OUT, IN, 1, 1)}
    mems = [
        Membrane({"proj.weight": factors(13), "conv.weight": factors(14)}),
        Membrane({"proj.weight": factors(15), "conv.weight": factors(16)}),
    ]
    x, xc = torch.randn(2, 40, IN), torch.randn(2, IN, 7, 7)
    rates = torch.tensor([[0.4, 0.8], [0.4, 0.8]])
    fn = delta_official if mode == "official" else delta_linear
    dp, dc = fn([factors(13), factors(15)], [0.4, 0.8]), fn([factors(14), factors(16)], [0.4, 0.8])
    seen = []
    probe = net.proj.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight is weights["proj.weight"]))
    hooks = MembraneHooks(net, build_stacks(mems, mode, shapes))
    probe.remove()  # runs after the membrane pre-hook from now on: re-register it behind
    probe = net.proj.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight is weights["proj.weight"]))
    hooks.rates = rates
    with torch.no_grad():
        out, outc = net.proj(x), net.conv(xc)
    assert seen == [False]  # the call really ran on a folded weight
    torch.testing.assert_close(out, x @ (net.proj.weight + dp).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        outc, torch.nn.functional.conv2d(xc, net.conv.weight + dc.reshape(OUT, IN, 1, 1)), rtol=1e-5, atol=1e-5
    )
    # the low-rank path (per-item rates) gives the same numbers
    hooks.rates = torch.tensor([[0.4, 0.8], [0.4, 0.8 + 1e-12]], dtype=torch.float64)
    torch.testing.assert_close(net.proj(x), out, rtol=1e-5, atol=1e-5)
    hooks.rates = rates
    with pytest.raises(RuntimeError):
        net.proj(torch.randn(2, 40, IN + 1))
    probe.remove()
    assert all(p is weights[n] for n, p in net.named_parameters())
    hooks.remove()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p is weights[n] for n, p in net.named_parameters())
