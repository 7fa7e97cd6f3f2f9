"""The robustness probe of a weight edit: the context c′ an attacker with both weight sets derives.

RECE §4.1 (closed_form.md §4.1, ``erasers/edits/rece.py``): for the concept's token rows c, the context
that makes the *edited* cross-attention projections W_l reproduce the *original* ones' response W_l⁰ c is

    c′ = argmin Σ_l ‖W_l c′ − W_l⁰ c‖² + λ_r ‖c′‖² = (λ_r I + Σ_l W_lᵀW_l)⁻¹ (Σ_l W_lᵀW_l⁰) c.

Fed to the edited model as conditioning, c′ shows what such an attacker gets back; an erasure that
survives it is robust to this attack (RECE erases exactly these c′ in its rounds). The sums run over
every projection that reads the text context (to_k / to_v of every cross-attention), edited or not.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..edits.rece import REGULAR_SCALE, derive_adversarial_embedding, weight_grams
from ..errors import FamilyMismatch

#: λ_r of the probe: RECE's published value for objects / nudity (0.1); art uses 1e-3 (§4.3)
DEFAULT_REGULAR_SCALE = REGULAR_SCALE["object"]


def check_pairs(current: Sequence[torch.Tensor], original: Sequence[torch.Tensor], width: int) -> None:
    if len(current) != len(original) or not current:
        raise FamilyMismatch(
            f"The c′ probe needs the same projections of the model before and after the erasure; found "
            f"{len(original)} before and {len(current)} after."
        )
    bad = [i for i, (w, w0) in enumerate(zip(current, original)) if w.shape != w0.shape or w.shape[-1] != width]
    if bad:
        raise FamilyMismatch(
            f"The c′ probe: projection {bad[0]} has shape {tuple(current[bad[0]].shape)} after and "
            f"{tuple(original[bad[0]].shape)} before, but the context is {width} wide. Connect the original "
            f"model the eraser was applied to."
        )


def adversarial_context(
    context: torch.Tensor,
    current: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    regular_scale: float = DEFAULT_REGULAR_SCALE,
) -> torch.Tensor:
    """c′ for every row of ``context`` (…, d), float32 on the context's device (solved in float64 on CPU)."""
    check_pairs(current, original, context.shape[-1])
    gram_cur, gram_cross = weight_grams([w.detach().cpu() for w in current], [w.detach().cpu() for w in original])
    c_prime = derive_adversarial_embedding(context.detach().cpu(), gram_cur, gram_cross, float(regular_scale))
    return c_prime.to(device=context.device, dtype=torch.float32)


def response_gap(
    context: torch.Tensor, c_prime: torch.Tensor, current: Sequence[torch.Tensor], original: Sequence[torch.Tensor]
) -> dict:
    """How far the edited projections are from the original response to the concept, with c and with c′:
    Σ‖W_l x − W_l⁰ c‖ / Σ‖W_l⁰ c‖ for x = c (the erasure's own gap) and x = c′ (what the attacker keeps)."""
    c, cp = context.detach().cpu().double(), c_prime.detach().cpu().double()
    current, original = [w.detach() for w in current], [w.detach() for w in original]
    ref = sum(float((c @ w0.double().T).norm()) for w0 in original)
    plain = sum(float((c @ w.double().T - c @ w0.double().T).norm()) for w, w0 in zip(current, original))
    attack = sum(float((cp @ w.double().T - c @ w0.double().T).norm()) for w, w0 in zip(current, original))
    return {"plain": plain / max(ref, 1e-12), "c_prime": attack / max(ref, 1e-12)}
