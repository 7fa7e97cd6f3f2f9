"""ESD (and other fine-tuned) UNet weight files: full or partial UNets of replacement weights.

ESD-u/ESD-x releases are whole UNets (diffusers or LDM names, possibly inside a full checkpoint with
VAE and text-encoder keys). They become deltas W_file − W_model; unchanged weights are dropped. With
``rank`` set, every 2-D/conv delta is replaced by its best rank-``rank`` approximation (truncated SVD) and
the worst relative Frobenius error is reported — the printed price of a small file.
"""

from __future__ import annotations

import logging

import torch

from ...lowrank import LowRankDelta
from ._common import UNET_NAME, ConversionReport, check_fit, group_factors, model_shapes, strip_weight_prefix
from .uce_weights import file_family

log = logging.getLogger(__name__)

NAME = "esd"
TITLE = "ESD / fine-tuned UNet weights (full or partial state dict)"
OTHER_PARTS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "text_encoder", "vae.")


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    if groups or not rest:
        return False
    unet = [k for k in rest if UNET_NAME.match(strip_weight_prefix(k))]
    return bool(unet) and all(k in unet or k.startswith(OTHER_PARTS) for k in rest)


def low_rank(delta: torch.Tensor, rank: int):
    """Truncated SVD of a 2-D view; returns (LowRankDelta, relative Frobenius error of what was dropped)."""
    mat = delta.reshape(delta.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    total = float(torch.linalg.vector_norm(s))
    keep = min(rank, s.shape[0])
    err = float(torch.linalg.vector_norm(s[keep:])) / total if total > 0 else 0.0
    root = s[:keep].sqrt()
    return LowRankDelta((u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float()), err


def convert(tensors, metadata, model_keys, source: str = "the ESD file", rank: int = None, **_):
    from ._common import replacement_deltas

    unet = {k: v for k, v in tensors.items() if not k.startswith(OTHER_PARTS)}
    report = ConversionReport(NAME, metadata=dict(metadata or {}), file_family=file_family(unet))
    skipped = len(tensors) - len(unet)
    if skipped:
        report.notes.append(f"{skipped} VAE/text-encoder tensor(s) ignored")
    deltas = replacement_deltas(unet, model_keys, report, source)
    if deltas or not report.matched:  # a file identical to the model is reported, not refused
        check_fit(deltas, model_shapes(model_keys), report, source)
    if rank:
        worst = 0.0
        for key, delta in list(deltas.items()):
            if delta.dim() >= 2 and min(delta.shape[0], delta[0].numel()) > rank:
                deltas[key], err = low_rank(delta, rank)
                worst = max(worst, err)
        report.notes.append(f"low-rank extraction at rank {rank}: worst relative error {worst:.3g}")
        log.warning("%s: rank-%d extraction, worst relative Frobenius error of a layer %.3g", source, rank, worst)
    return deltas, report
