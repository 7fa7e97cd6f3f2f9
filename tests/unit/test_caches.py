"""nodes/caches.py and its users: bounded, keyed by exact content (never id() or a rounded sum)."""

import torch
from pack_import import pack_module

caches = pack_module("nodes.caches")
hooks = pack_module("nodes.suppression_hooks")
runtime = pack_module("nodes.spm_runtime")


def test_tensor_key_tells_apart_rows_with_the_same_sum():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 2.0, 1.0])
    assert a.sum() == b.sum()
    assert caches.tensor_key(a) != caches.tensor_key(b)
    assert caches.tensor_key(a) == caches.tensor_key(a.clone())
    assert caches.tensor_key(a) != caches.tensor_key(a.double())


def test_bounded_cache_keeps_the_most_recent_entries():
    cache = caches.BoundedCache(3)
    for i in range(10):
        cache[i] = i
        _ = cache[0] if 0 in cache else None  # 0 stays: it is used each time
    assert len(cache) == 3 and 0 in cache and 9 in cache


def test_gate_log_decides_per_exact_prompt_and_stays_bounded(monkeypatch):
    """Two different rows with the same rounded sum used to share one gate decision."""
    scores = iter([0.9, 0.1] + [0.1] * 1000)
    monkeypatch.setattr(hooks, "risk_score", lambda row, concept, skip_first=True: next(scores))
    gate = hooks.GateLog("Test", 0.5)
    concept = torch.zeros(1, 3)
    risky, benign = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    assert gate(risky, concept) is True
    assert gate(benign, concept) is False
    assert gate(risky, concept) is True  # cached, not re-scored
    for i in range(1000):
        gate(torch.full((1, 3), float(i)), concept)
    assert len(gate.seen) <= gate.seen.size


def test_membrane_rates_cache_is_bounded():
    mset = runtime.MembraneSet()
    assert isinstance(mset._rates, caches.BoundedCache) and mset._rates.size <= 256
