"""Concept attention guidance: Normalized Attention Guidance with the concept as the negative branch.

suppression.md §5.4 (Chen et al., arXiv 2505.21179). Per attention layer, the image queries attend once
to the prompt (Z⁺) and once to the concept keywords (Z⁻); then

    Z̃ = Z⁺ + (φ − 1)(Z⁺ − Z⁻)                  extrapolate away from the concept   (φ = 1: Z̃ = Z⁺)
    s = ‖Z̃‖₁ / ‖Z⁺‖₁   per token, over channels
    Ẑ = Z̃ · min(s, τ) / s                        cap the norm growth at τ
    Z = α·Ẑ + (1 − α)·Z⁺                         blend

Only the positive (cond) branch is guided. Because it acts inside attention it works where CFG
negatives do nothing (guidance-distilled Flux, few-step models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import SuppressionConfig

#: published σ cut-offs: NAG acts while σ ≥ σ_end (README guidance and shipped workflows, §5.4 / §7.1)
SIGMA_END = {"sd1": 4.0, "sd2": 4.0, "sdxl": 4.0, "unet": 4.0, "sd3": 0.75, "flux": 0.75}
#: Wan: no published NAG cut-off in this form; the pack's flow-model value (SD3/Flux) is used
SIGMA_END["wan"] = SIGMA_END["flux"]
#: Chroma, Flux.2, Qwen-Image: flow models like Flux.1 (NAG's Flux cut-off; none published for them)
SIGMA_END.update(chroma=SIGMA_END["flux"], flux2=SIGMA_END["flux"], qwen_image=SIGMA_END["flux"])
#: HiDream-I1: a flow model too (ModelSamplingSD3, shift 3): the same cut-off
SIGMA_END["hidream"] = SIGMA_END["flux"]
#: AuraFlow: a flow model (ModelSamplingAuraFlow, shift 1.73): the same cut-off
SIGMA_END["auraflow"] = SIGMA_END["flux"]
#: shipped α per family where it differs from 0.25 (SD1.5 workflow: 0.38)
ALPHA = {"sd1": 0.38}


@dataclass
class ConceptGuidanceConfig(SuppressionConfig):
    method = "concept_guidance"

    phi: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    #: None → the published cut-off of the model family (``SIGMA_END``)
    sigma_end: Optional[float] = None

    def validate(self) -> None:
        super().validate()
        self._check_number("phi", self.phi, 1.0, None)
        self._check_number("tau", self.tau, 1.0, None)
        self._check_number("alpha", self.alpha, 0.0, 1.0)
        if self.sigma_end is not None:
            self._check_number("sigma_end", self.sigma_end, 0.0, None)

    def sigma_end_for(self, family: str) -> float:
        return float(self.sigma_end) if self.sigma_end is not None else SIGMA_END.get(family, 0.0)

    @property
    def effective_alpha(self) -> float:
        """strength scales the blend: 0 → Z⁺ (off), 1 → the configured α."""
        return min(1.0, self.alpha * self.strength)


def extrapolate(z_pos: torch.Tensor, z_neg: torch.Tensor, phi: float) -> torch.Tensor:
    """Z̃ = Z⁺ + (φ − 1)(Z⁺ − Z⁻)  (= φZ⁺ − (φ − 1)Z⁻)."""
    return z_pos + (phi - 1.0) * (z_pos - z_neg)


def l1_ratio(z_tilde: torch.Tensor, z_pos: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """s = ‖Z̃‖₁ / ‖Z⁺‖₁ per token (last dimension = channels)."""
    return z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True).clamp_min(eps)


def normalise(z_tilde: torch.Tensor, s: torch.Tensor, tau: float, eps: float = 1e-6) -> torch.Tensor:
    """Ẑ = Z̃ · min(s, τ)/s: leaves tokens with s ≤ τ alone, scales the others down to ‖Ẑ‖₁ = τ‖Z⁺‖₁."""
    return z_tilde * (s.clamp(max=tau) / s.clamp_min(eps))


def nag(z_pos: torch.Tensor, z_neg: torch.Tensor, phi: float, tau: float, alpha: float) -> torch.Tensor:
    """The guided attention output (computed in float32, returned in Z⁺'s dtype)."""
    zp, zn = z_pos.float(), z_neg.float()
    z_tilde = extrapolate(zp, zn, phi)
    z_hat = normalise(z_tilde, l1_ratio(z_tilde, zp), tau)
    return (alpha * z_hat + (1.0 - alpha) * zp).to(z_pos.dtype)
