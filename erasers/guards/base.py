"""What the four sampling-time suppression methods share: the config base, the σ window, the risk gate.

SAFREE, SLD, concept guidance and token suppression touch no weights; they act while sampling and must
leave benign prompts alone. Each has a config dataclass derived from ``SuppressionConfig`` (strength,
start/end percent of the schedule, risk-gate threshold) and reports a risk score per prompt, so a user
can see in the log why a prompt was or was not touched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from ..config import ConfigError, SerialisedConfig
from ..text import check_prompts, split_concepts

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parents[1] / "data" / "presets"


def preset_names() -> list:
    return sorted(p.stem for p in PRESET_DIR.glob("*.txt"))


def load_preset(name: str) -> list:
    """Keyword list of a preset file (``erasers/data/presets/<name>.txt``; '#' lines are comments)."""
    path = PRESET_DIR / f"{name}.txt"
    if not path.is_file():
        raise ConfigError(f"Unknown keyword preset '{name}'; available: {', '.join(preset_names())}.")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@dataclass
class SuppressionConfig(SerialisedConfig):
    """Fields every sampling-time method has.

    strength: 0 switches the method off (the node then returns the model unpatched: bit-identical output).
    start_percent / end_percent: the part of the schedule where the method acts, converted to σ with the
        model's own sampling schedule (0 = first step, 1 = last).
    risk_gate: prompts whose risk score (max similarity to the concepts) is below this are untouched;
        0 disables the gate (every prompt is treated; the score is still logged).
    """

    method: ClassVar[str] = ""
    #: a method with a built-in default concept (SLD's safety text, SAFREE presets) may leave it empty
    concepts_required: ClassVar[bool] = True

    concepts: list = field(default_factory=list)
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    risk_gate: float = 0.0

    def __post_init__(self):
        if isinstance(self.concepts, str):
            self.concepts = split_concepts(self.concepts)
        self.concepts = list(self.concepts or [])
        self.validate()

    def validate(self) -> None:
        if self.concepts_required or self.concepts:
            self.concepts = check_prompts(self.concepts, "concept to suppress")
        self._check_number("strength", self.strength, 0.0, None)
        self._check_number("start_percent", self.start_percent, 0.0, 1.0)
        self._check_number("end_percent", self.end_percent, 0.0, 1.0)
        if self.end_percent < self.start_percent:
            raise ConfigError(
                f"{self.method}: end_percent ({self.end_percent}) must not be below start_percent "
                f"({self.start_percent}); the method acts between the two."
            )
        self._check_number("risk_gate", self.risk_gate, 0.0, 1.0)

    def _check_number(self, name: str, value, low: Optional[float], high: Optional[float]) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            rng = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
            raise ConfigError(f"{self.method}: {name} must be a number {rng}, found {value!r}.")

    @property
    def active(self) -> bool:
        return self.strength > 0


# -- σ window ---------------------------------------------------------------------------------------


def sigma_window(percent_to_sigma, start_percent: float, end_percent: float) -> tuple:
    """(σ_start, σ_end) from the model's own ``percent_to_sigma`` (σ_start ≥ σ_end)."""
    return float(percent_to_sigma(start_percent)), float(percent_to_sigma(end_percent))


def in_window(sigma, sigma_start: float, sigma_end: float) -> bool:
    """True while σ_end ≤ σ ≤ σ_start (ComfyUI's convention: percent 0 ↔ the largest σ)."""
    s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    return sigma_end <= s <= sigma_start


# -- risk gate --------------------------------------------------------------------------------------


def risk_score(prompt_hidden: torch.Tensor, concept_hidden: torch.Tensor, skip_first: bool = True) -> float:
    """Facilitated-transport-style risk: max over concepts of the cosine of the flattened token sequences.

    prompt_hidden (T, d), concept_hidden (K, T', d). Compared over the common length; position 0 is
    dropped for CLIP encoders (the start token is identical for every prompt and would inflate the score).
    """
    p = prompt_hidden.float()
    c = concept_hidden.float()
    length = min(p.shape[-2], c.shape[-2])
    lo = 1 if (skip_first and length > 1) else 0
    p = p[lo:length].reshape(-1)
    c = c[:, lo:length].reshape(c.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(c, p[None], dim=-1, eps=1e-8)
    return float(cos.max())


def gate_passes(score: float, threshold: float) -> bool:
    return threshold <= 0 or score >= threshold


def log_gate(method: str, score: float, threshold: float, what: str = "prompt") -> bool:
    """Decide and log once per prompt: the user sees the score and the threshold it was compared to."""
    passed = gate_passes(score, threshold)
    log.info(
        "%s: risk score %.3f for the %s (gate %.3f) → %s",
        method,
        score,
        what,
        threshold,
        "suppressing" if passed else "left untouched",
    )
    return passed
