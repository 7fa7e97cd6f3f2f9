"""Attention over a union of key sets from attention over each set: the log-sum-exp merge.

For one query q and keys split into disjoint sets A and B, softmax attention over A ∪ B is

    o_A = Σ_{j∈A} e^{s_j} v_j / Z_A,   ℓ_A = log Z_A = logsumexp_{j∈A} s_j        (s_j = q·k_j/√d + bias_j)
    o_{A∪B} = (e^{ℓ_A} o_A + e^{ℓ_B} o_B) / (e^{ℓ_A} + e^{ℓ_B}),   ℓ_{A∪B} = logsumexp(ℓ_A, ℓ_B)

— the identity behind flash attention's blockwise softmax; it is exact, not an approximation. NAG on a
DiT (concept_guidance.py) needs the image queries' attention twice: over [prompt text, image] keys (Z⁺)
and over [concept text, image] keys (Z⁻). The image-key part is the expensive one (N² for N image
tokens); with this merge it is computed once and shared, and only the small text-key parts differ.

Tensors are (B, H, L, D) throughout; ``lse`` is (B, H, Lq) in float32.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Tuple

import torch

log = logging.getLogger(__name__)

#: query rows per chunk in the plain fallback: bounds its (B, H, chunk, Lk) float32 score tensor
FALLBACK_QUERY_CHUNK = 1024

_FUSED_CHECKED: dict = {}


def merge(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o_{A∪B}, ℓ_{A∪B}) from the two partial attentions (module docstring), computed in float32."""
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)  # ≤ 1: no overflow
    total = w_a + w_b
    out = o_a.float() * (w_a / total)[..., None] + o_b.float() * (w_b / total)[..., None]
    return out, m + torch.log(total)


def plain_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d + bias)V and its log-sum-exp, written out in float32 (any device), query chunks."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, q.shape[2], FALLBACK_QUERY_CHUNK):
        qc = q[:, :, start : start + FALLBACK_QUERY_CHUNK].float()
        s = qc @ kf.transpose(-1, -2) * scale
        if bias is not None:
            s = s + (bias[:, :, start : start + FALLBACK_QUERY_CHUNK] if bias.shape[2] > 1 else bias).float()
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse[..., None]) @ vf)
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _fused(q, k, v, bias):
    """The host torch's own kernel that also returns the log-sum-exp, or None where it has none."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)[:2]
        return out, lse.float()
    if q.device.type == "cuda" and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention"):
        mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        q, k, v = (t.contiguous() for t in (q, k, v))  # the CPU kernel takes strided views; keep CUDA's simple
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True)[:2]
        return out, lse[..., : q.shape[2]].float()  # the kernel pads its lse rows to a multiple of 32
    return None


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(softmax(QKᵀ/√d + bias)V, logsumexp) for (B, H, L, D) tensors; ``bias`` broadcastable to (B, H, Lq, Lk).

    Uses torch's fused kernel that returns the log-sum-exp when the device has one — checked once per
    (device, dtype) against the plain formula, because these kernels are torch-internal — else the plain
    formula.
    """
    key = (q.device.type, q.dtype)
    if _FUSED_CHECKED.get(key) is None:
        _FUSED_CHECKED[key] = _check_fused(q.device, q.dtype)
    if _FUSED_CHECKED[key]:
        try:
            result = _fused(q, k, v, bias)
        except RuntimeError as exc:  # e.g. a head size or layout this kernel does not take
            log.debug("fused attention with log-sum-exp refused (%s); using the plain formula", exc)
            result = None
        if result is not None:
            return result
    return plain_attention_lse(q, k, v, bias)


def _check_fused(device, dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=gen).to(device, dtype) for _ in range(3))
    bias = torch.randn(2, 1, 1, 40, generator=gen).to(device)
    try:
        got = _fused(q, k, v, bias)
    except RuntimeError as exc:
        log.debug("no fused attention with log-sum-exp on %s/%s: %s", device, dtype, exc)
        return False
    if got is None:
        return False
    want = plain_attention_lse(q, k, v, bias)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = bool(
        torch.allclose(got[0].float(), want[0].float(), atol=tol, rtol=tol)
        and torch.allclose(got[1], want[1], atol=tol, rtol=tol)
    )
    if not ok:
        log.warning(
            "torch's fused attention kernel on %s/%s disagrees with the plain formula; concept guidance "
            "uses the plain formula (slower, same result)",
            device,
            dtype,
        )
    return ok
