"""Safe Latent Diffusion (Schramowski et al., CVPR 2023): a gated third guidance branch.

suppression.md §2.1, with the diffusers code semantics. Three noise predictions per step ε_∅, ε_p, ε_S:

    μ   = clamp(s_S·|ε_p − ε_S|, max=1), and μ = 0 wherever (ε_p − ε_S) ≥ λ
    γ_t = μ ⊙ (ε_S − ε_∅)
    γ_t ← γ_t + s_m·ν_t ;  ν_{t+1} = β_m·ν_t + (1 − β_m)·γ_t      (momentum accumulates during warm-up too)
    ε̃   = ε_∅ + s_g·((ε_p − ε_∅) − 𝟙[i ≥ δ]·γ_t)

λ and the clamp are in ε units. ComfyUI hands over x₀ predictions, so the host converts with ``to_eps``
(ε- and v-prediction models: ComfyUI runs both as x = x₀ + σ·ε) or, for flow models, works on the
velocity v = ε − x₀ (``to_velocity``), §8. Since ε̃ = ε_∅ + s_g(ε_p′ − ε_∅) with ε_p′ = ε_p − 𝟙γ, the
update can be applied to the positive prediction before the host's own CFG (``apply_to_cond``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError
from .base import SuppressionConfig

#: the default safety concept (§2.3)
SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
    "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
    "weapons, child abuse, brutality, cruelty"
)

#: preset → (warm-up δ, s_S, λ, s_m, β_m)  (§2.2)
PRESETS = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}

PARAMETERISATIONS = ("eps", "v", "flow")


@dataclass
class SLDConfig(SuppressionConfig):
    method = "sld"
    concepts_required = False

    preset: str = "medium"
    #: explicit values override the preset (None → the preset's)
    warmup_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    threshold: Optional[float] = None
    momentum_scale: Optional[float] = None
    momentum_beta: Optional[float] = None
    #: steps of the paper's reference schedule (50); δ is rescaled to the actual step count
    reference_steps: int = 50

    def validate(self) -> None:
        super().validate()
        if not self.concepts:
            self.concepts = [SAFETY_CONCEPT]
        if self.preset not in PRESETS:
            raise ConfigError(f"sld: preset must be one of {list(PRESETS)}, found '{self.preset}'.")
        d, s, lam, sm, bm = PRESETS[self.preset]
        self.warmup_steps = d if self.warmup_steps is None else int(self.warmup_steps)
        self.guidance_scale = s if self.guidance_scale is None else float(self.guidance_scale)
        self.threshold = lam if self.threshold is None else float(self.threshold)
        self.momentum_scale = sm if self.momentum_scale is None else float(self.momentum_scale)
        self.momentum_beta = bm if self.momentum_beta is None else float(self.momentum_beta)
        self._check_number("warmup_steps", self.warmup_steps, 0, None)
        self._check_number("guidance_scale", self.guidance_scale, 0.0, None)
        self._check_number("momentum_scale", self.momentum_scale, 0.0, None)
        self._check_number("momentum_beta", self.momentum_beta, 0.0, 1.0)
        if int(self.reference_steps) < 1:
            raise ConfigError(f"sld: reference_steps must be ≥ 1, found {self.reference_steps}.")

    @property
    def safety_concept(self) -> str:
        return ", ".join(self.concepts)

    def warmup_for(self, total_steps: int) -> int:
        """δ rescaled from the 50-step reference to the run's step count (δ/50 of the schedule)."""
        if total_steps <= 0:
            return self.warmup_steps
        return int(round(self.warmup_steps * total_steps / float(self.reference_steps)))


# -- x₀ ↔ ε ↔ v (suppression.md §8) -----------------------------------------------------------------


def to_eps(x: torch.Tensor, x0: torch.Tensor, sigma, parameterisation: str = "eps") -> torch.Tensor:
    """ε from the denoised x₀ at noise level σ.

    "eps" and "v" (ComfyUI runs v-prediction models in the same k-diffusion form x = x₀ + σ·ε):
    ε = (x − x₀)/σ. "flow" (x_t = (1 − σ)·x₀ + σ·ε): ε = (x_t − (1 − σ)·x₀)/σ.
    """
    s = _sigma_like(sigma, x)
    if parameterisation in ("eps", "v"):
        return (x - x0) / s
    if parameterisation == "flow":
        return (x - (1 - s) * x0) / s
    raise ConfigError(f"parameterisation must be one of {PARAMETERISATIONS}, found '{parameterisation}'.")


def from_eps(x: torch.Tensor, eps: torch.Tensor, sigma, parameterisation: str = "eps") -> torch.Tensor:
    """Inverse of ``to_eps``: x₀ = x − σ·ε (eps/v), x₀ = (x − σ·ε)/(1 − σ) (flow; singular at σ = 1)."""
    s = _sigma_like(sigma, x)
    if parameterisation in ("eps", "v"):
        return x - s * eps
    if parameterisation == "flow":
        return (x - s * eps) / (1 - s)
    raise ConfigError(f"parameterisation must be one of {PARAMETERISATIONS}, found '{parameterisation}'.")


def to_velocity(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """Flow velocity v = ε − x₀ = (x_t − x₀)/σ."""
    return (x - x0) / _sigma_like(sigma, x)


def from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x₀ = x_t − σ·v."""
    return x - _sigma_like(sigma, x) * v


def to_v_prediction(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """The v target of a v-prediction (VP) model, from the k-diffusion form x = x₀ + σ·ε:
    with α_t = 1/√(1+σ²), σ_t = σ/√(1+σ²): v = α_t·ε − σ_t·x₀."""
    s = _sigma_like(sigma, x)
    eps = (x - x0) / s
    norm = (1 + s * s).sqrt()
    return eps / norm - s * x0 / norm


def to_guidance_space(x, x0, sigma, parameterisation):
    """The space SLD's thresholds are defined in: ε for UNets (eps and v models), velocity for flow."""
    return to_velocity(x, x0, sigma) if parameterisation == "flow" else to_eps(x, x0, sigma, parameterisation)


def from_guidance_space(x, g, sigma, parameterisation):
    return from_velocity(x, g, sigma) if parameterisation == "flow" else from_eps(x, g, sigma, parameterisation)


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s
    return s.reshape(-1, *([1] * (x.ndim - 1)))


# -- the update ---------------------------------------------------------------------------------------


def safety_scale(eps_cond: torch.Tensor, eps_safety: torch.Tensor, s_s: float, lam: float) -> torch.Tensor:
    """μ = clamp(s_S·|ε_p − ε_S|, max=1), zeroed where ε_p − ε_S ≥ λ (§2.1; the code's min(1, ·))."""
    diff = eps_cond - eps_safety
    mu = torch.clamp((diff * s_s).abs(), max=1.0)
    return torch.where(diff >= lam, torch.zeros_like(mu), mu)


@dataclass
class SLDState:
    """Momentum ν and the step counter of one sampling run."""

    momentum: Optional[torch.Tensor] = None
    step: int = 0

    def reset(self) -> None:
        self.momentum, self.step = None, 0


def sld_gamma(eps_uncond, eps_cond, eps_safety, state: SLDState, config: SLDConfig, warmup: int) -> torch.Tensor:
    """The term subtracted from (ε_p − ε_∅) at this step, 𝟙[i ≥ δ]·γ_t, times ``strength``; advances
    the momentum and the step counter in ``state``."""
    mu = safety_scale(eps_cond, eps_safety, config.guidance_scale, config.threshold)
    gamma = mu * (eps_safety - eps_uncond)
    if state.momentum is None:
        state.momentum = torch.zeros_like(gamma)
    gamma = gamma + config.momentum_scale * state.momentum
    state.momentum = config.momentum_beta * state.momentum + (1 - config.momentum_beta) * gamma
    active = state.step >= warmup
    state.step += 1
    if not active:
        return torch.zeros_like(gamma)
    return gamma * config.strength


def apply_to_cond(eps_cond: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """ε_p′ = ε_p − 𝟙γ: the host's CFG then yields ε_∅ + s_g((ε_p − ε_∅) − 𝟙γ), the paper's ε̃."""
    return eps_cond - gamma


def sld_combine(
    eps_uncond, eps_cond, eps_safety, cfg_scale: float, state: SLDState, config: SLDConfig, warmup: int
) -> torch.Tensor:
    """ε̃ in one call (diffusers and tests)."""
    gamma = sld_gamma(eps_uncond, eps_cond, eps_safety, state, config, warmup)
    return eps_uncond + cfg_scale * ((eps_cond - eps_uncond) - gamma)
