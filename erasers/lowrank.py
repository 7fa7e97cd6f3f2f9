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
