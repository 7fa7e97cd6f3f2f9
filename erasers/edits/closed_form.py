"""The ridge-regression closed form shared by TIME, UCE, RECE and MACE's refinement.

closed_form.md (★):   W = (λW₀ + Σ ω_j v*_j k_jᵀ)(λI + Σ ω_j k_j k_jᵀ)⁻¹

When every target is the *same* layer's output of another embedding, v* = W₀c* (erase towards an
anchor) or v* = W₀c (preserve), (★) factors as W = W₀·T with one d×d matrix T shared by every layer
that reads the same context, and

    ΔW = W − W₀ = W₀ · η_e (C* − C)ᵀ · C (λI + η_e CᵀC + η_p PᵀP)⁻¹            (derived from ★)

so the solve happens once per context width, not once per layer, and ΔW has rank ≤ n (erased keys).
Rows of C, C*, P are token embeddings (n×d, n×d, m×d). Everything runs in float64.
"""

from __future__ import annotations

from typing import Optional

import torch


def same_length(a: torch.Tensor, b: torch.Tensor):
    """Two (N, T, d) row sets padded with zero rows to one T, for position-by-position alignment.

    CLIP and Flux's T5 give every prompt the same number of rows; chat-template encoders (Qwen-Image,
    Z-Image, Flux.2) give each batch its own length. A zero key adds nothing to any gram KᵀK or C*ᵀC, so
    the padding changes no solve.
    """
    t = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, t - x.shape[1])) if x.shape[1] < t else x  # noqa: E731
    return pad(a), pad(b)


def gram(keys: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Σ_j ω k_j k_jᵀ = ω KᵀK for the rows of ``keys`` (float64)."""
    keys = keys.to(torch.float64)
    return scale * (keys.T @ keys)


def regularised_gram(
    lam: float,
    erase_keys: torch.Tensor,
    eta_e: float,
    preserve_keys: Optional[torch.Tensor],
    eta_p: float,
    preserve_gram: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The matrix (λI + η_e CᵀC + η_p PᵀP) that (★) inverts; a precomputed PᵀP may be passed."""
    d = erase_keys.shape[1]
    mat = lam * torch.eye(d, dtype=torch.float64) + gram(erase_keys, eta_e)
    if preserve_gram is not None:
        mat = mat + eta_p * preserve_gram.to(torch.float64)
    elif preserve_keys is not None and preserve_keys.numel():
        mat = mat + gram(preserve_keys, eta_p)
    return mat


def shared_factors(
    erase_keys: torch.Tensor,
    erase_targets: torch.Tensor,
    lam: float,
    eta_e: float,
    preserve_keys: Optional[torch.Tensor] = None,
    eta_p: float = 1.0,
    preserve_gram: Optional[torch.Tensor] = None,
):
    """(A, B) with ΔW = W₀ A B for every layer reading this context.

    A = η_e (C* − C)ᵀ  (d×n),   B = C (λI + η_e CᵀC + η_p PᵀP)⁻¹  (n×d)
    The system is symmetric positive definite for λ > 0, so it is solved (never inverted) with Cholesky,
    falling back to a general solve when λ = 0 leaves it only semi-definite.
    """
    c = erase_keys.to(torch.float64)
    c_star = erase_targets.to(torch.float64)
    mat = regularised_gram(lam, c, eta_e, preserve_keys, eta_p, preserve_gram)
    factor, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        b_t = torch.cholesky_solve(c.T, factor)  # mat⁻¹ Cᵀ, i.e. Bᵀ (mat is symmetric)
    else:
        b_t = torch.linalg.solve(mat, c.T)
    return eta_e * (c_star - c).T, b_t.T


def apply_ridge(
    w0: torch.Tensor, lam: float, keys: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Reference (★) with arbitrary targets v*, one layer, by a direct solve. Used by tests and RECE.

    keys: (n, d); targets: (n, out); weights ω: (n,) or None.
    """
    w0 = w0.to(torch.float64)
    k = keys.to(torch.float64)
    v = targets.to(torch.float64)
    om = torch.ones(k.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    d = k.shape[1]
    mat2 = lam * torch.eye(d, dtype=torch.float64) + (k.T * om) @ k
    mat1 = lam * w0 + (v.T * om) @ k
    return torch.linalg.solve(mat2, mat1.T).T  # mat1 · mat2⁻¹ (mat2 symmetric)
