"""Exact low-rank deltas.

Every closed-form edit in the pack has the shape ΔW = W₀·X·Y with X: d×n, Y: n×d and n the number of
erased keys, so it is stored *exactly* as factors ``up`` (out×n) and ``down`` (n×d) — the kohya LoRA
layout — instead of a dense out×d matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LowRankDelta:
    """ΔW = up @ down. float32 on CPU when stored; the math that makes them runs in float64."""

    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple:
        return (self.up.shape[0], self.down.shape[1])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.up.to(torch.float64) @ self.down.to(torch.float64)).to(dtype)

    def to(self, dtype: torch.dtype) -> "LowRankDelta":
        return LowRankDelta(self.up.to(dtype), self.down.to(dtype))

    def concat(self, other: "LowRankDelta") -> "LowRankDelta":
        """Δ₁ + Δ₂ as one factor pair (rank adds)."""
        return LowRankDelta(torch.cat([self.up, other.up], dim=1), torch.cat([self.down, other.down], dim=0))

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.up).all() and torch.isfinite(self.down).all())


def compress(delta: LowRankDelta, rank_cap: Optional[int] = None, rtol: float = 1e-7):
    """Minimal-rank factors of ``up @ down`` via QR + SVD of the small core.

    Directions with singular value ≤ rtol·σ_max are numerically zero and dropped; ``rank_cap`` keeps only
    the largest ones (a truncated SVD). Returns (delta, relative Frobenius error of what was dropped).
    """
    up = delta.up.to(torch.float64)
    down = delta.down.to(torch.float64)
    if up.shape[1] == 0:
        return delta, 0.0
    q_up, r_up = torch.linalg.qr(up)  # up = Qu Ru
    q_down, r_down = torch.linalg.qr(down.T)  # downᵀ = Qd Rd
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    total = float(torch.linalg.vector_norm(s))
    if total == 0.0:
        return LowRankDelta(up[:, :0].float(), down[:0].float()), 0.0
    keep = int((s > rtol * s[0]).sum())
    if rank_cap is not None:
        keep = min(keep, int(rank_cap))
    keep = max(keep, 1)
    dropped = float(torch.linalg.vector_norm(s[keep:])) / total
    sqrt_s = s[:keep].sqrt()
    new_up = (q_up @ u[:, :keep]) * sqrt_s  # balanced factors: both halves carry √σ
    new_down = sqrt_s[:, None] * (vh[:keep] @ q_down.T)
    return LowRankDelta(new_up.float(), new_down.float()), dropped


def truncate(delta: LowRankDelta, tolerance: float):
    """(ΔW_k, error): the smallest rank k whose relative Frobenius error ‖ΔW − ΔW_k‖/‖ΔW‖ is ≤ ``tolerance``.

    Eckart–Young: the best rank-k approximation is the projection of ΔW on its top-k singular subspace,
    whose error is √(Σ_{i>k} σ_i²)/‖ΔW‖. The subspace comes from an eigendecomposition of the smaller
    Gram (ΔWᵀΔW or ΔWΔWᵀ, float64: a third of the cost of an SVD); the factors are ΔW V_k and V_kᵀ
    (or U_k and U_kᵀ ΔW), and the returned error is measured on them, not read off the spectrum.
    Meant for *storage* of deltas that have no exact low-rank form smaller than the dense matrix.
    """
    x = delta.dense(torch.float64)
    out, inn = x.shape
    total = float(torch.linalg.vector_norm(x))
    if total == 0.0:
        return LowRankDelta(x[:, :0].float(), x[:0].float()), 0.0
    right = inn <= out
    lam, vec = torch.linalg.eigh(x.T @ x if right else x @ x.T)
    lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)  # σ², largest first
    tail = (lam.sum() - lam.cumsum(0)).clamp_min(0.0).sqrt() / total  # tail[k-1]: error when keeping k
    keep = min(int((tail > tolerance).sum()) + 1, len(lam))
    basis = vec[:, :keep]
    up, down = (x @ basis, basis.T) if right else (basis, basis.T @ x)
    error = float(torch.linalg.vector_norm(x - up @ down)) / total
    return LowRankDelta(up.float(), down.float()), error
