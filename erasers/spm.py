"""SPM membranes at run time: per-prompt rates, the two combination rules, the per-item forward.

A membrane (or any erasure LoRA) is a set of low-rank deltas ΔWᵢ = UᵢDᵢ (α/r folded into U) opened by a
``Gate``: "always" (rate = strength) or "facilitated transport" (rate = strength · m(p), transport.py).
Several membranes with rates mᵢ combine as (spm.md §4.2):
    official:  ΔW = (Σᵢ mᵢUᵢ)(Σⱼ mⱼDⱼ)   — both factors scaled, summed before the product: one membrane
               acts at m², several produce cross terms mᵢmⱼUᵢDⱼ (reproduces the reference images);
    linear:    ΔW = Σᵢ mᵢ UᵢDᵢ          — each membrane at rate m, independently.
Because m depends on the prompt, the delta is never baked into W: ``membrane_forward`` adds ΔW(m_b)·x_b
per batch item b inside the host's forward, so cond and uncond rows of one item share that item's m.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from .errors import EraserError
from .lowrank import LowRankDelta
from .text import check_prompts
from .transport import METRICS, permeability

COMBINATIONS = ("official", "linear")
GATE_ALWAYS, GATE_FT = "always", "facilitated transport"
GATE_MODES = (GATE_ALWAYS, GATE_FT)


class CombinationError(EraserError):
    pass


@dataclass
class Gate:
    """When an eraser acts: always, or as open as facilitated transport says for the current prompt."""

    mode: str = GATE_ALWAYS
    concepts: list = field(default_factory=list)
    metric: str = "clipcos_tokenuni"

    def __post_init__(self):
        if self.mode not in GATE_MODES:
            raise EraserError(f"gate must be one of {GATE_MODES}, found '{self.mode}'.")
        if self.metric not in METRICS:
            raise EraserError(f"transport metric must be one of {METRICS}, found '{self.metric}'.")
        if self.mode == GATE_FT:
            self.concepts = check_prompts(self.concepts, "concept for facilitated transport")

    @property
    def transport(self) -> bool:
        return self.mode == GATE_FT

    def to_dict(self) -> dict:
        return {"mode": self.mode, "concepts": list(self.concepts), "metric": self.metric}


@dataclass
class Membrane:
    """Deltas (canonical key or (key, offset) → LowRankDelta | dense tensor) plus gate and strength."""

    deltas: dict
    gate: Gate = field(default_factory=Gate)
    strength: float = 1.0
    name: str = "membrane"

    def __post_init__(self):
        if not (self.strength == self.strength):
            raise EraserError(f"strength must be a number, found {self.strength!r}.")

    def unet_deltas(self) -> dict:
        return {k: d for k, d in self.deltas.items() if not _name(k).startswith("te.")}


def _name(key) -> str:
    return key[0] if isinstance(key, tuple) else key


# --- the two combination rules, dense (reference and tests) ------------------------------------------
def delta_official(factors: Sequence[LowRankDelta], rates: Sequence[float]) -> torch.Tensor:
    """(Σᵢ mᵢUᵢ)(Σⱼ mⱼDⱼ), spm.md §4.2 — the reference's weighted state-dict sum loaded as one adapter."""
    up = sum(float(m) * f.up.double() for f, m in zip(factors, rates))
    down = sum(float(m) * f.down.double() for f, m in zip(factors, rates))
    return (up @ down).float()


def delta_linear(factors: Sequence[LowRankDelta], rates: Sequence[float]) -> torch.Tensor:
    """Σᵢ mᵢUᵢDᵢ, each membrane at its own rate (the notebook's merge_to_sd_model, spm.md §4.2)."""
    return sum(float(m) * f.dense(torch.float64) for f, m in zip(factors, rates)).float()


# --- rates --------------------------------------------------------------------------------------------
class RateCache:
    """Per-prompt rates of each membrane, cached by prompt text (FT needs one text encode per prompt)."""

    def __init__(self, membranes: Sequence[Membrane], encoder=None):
        self.membranes = list(membranes)
        self.encoder = encoder
        self.cache = {}
        self._concepts = None
        ft = [m for m in self.membranes if m.gate.transport]
        if ft and encoder is None:
            raise EraserError("Facilitated transport needs the text encoder of the model (connect CLIP).")

    def _concept_encoding(self):
        if self._concepts is None:
            texts = [c for m in self.membranes if m.gate.transport for c in m.gate.concepts]
            self._concepts = self.encoder.encode(texts) if texts else None
        return self._concepts

    def rates(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, M) float32: rate of membrane i for prompt n = strength · (m(p) if FT else 1)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            self.cache.update(zip(todo, self.compute(self.encoder.encode(todo) if self._needs_text() else None,
                                                     len(todo))))
        return torch.stack([self.cache[p] for p in prompts]) if prompts else torch.zeros(0, len(self.membranes))

    def rates_from_encoding(self, encoding) -> torch.Tensor:
        return self.compute(encoding, len(encoding))

    def _needs_text(self) -> bool:
        return any(m.gate.transport for m in self.membranes)

    def compute(self, encoding, count: int) -> torch.Tensor:
        out = torch.tensor([[m.strength for m in self.membranes]] * count, dtype=torch.float64)
        ft = [i for i, m in enumerate(self.membranes) if m.gate.transport]
        if ft:
            groups = [len(self.membranes[i].gate.concepts) for i in ft]
            metric = self.membranes[ft[0]].gate.metric
            perm = permeability(encoding, self._concept_encoding(), groups, metric)
            out[:, ft] *= perm
        return out.float()


# --- run time -------------------------------------------------------------------------------------------
@dataclass
class LayerStack:
    """Every membrane's terms on one module, pre-stacked so one forward serves the whole batch."""

    module: str  # canonical module path (key without .weight)
    weight_shape: tuple
    combination: str
    n: int
    up: Optional[torch.Tensor] = None  # official: (n, out, r); linear: (out, R)
    down: Optional[torch.Tensor] = None  # official: (n, r, in); linear: (R, in)
    owner: Optional[torch.Tensor] = None  # linear: membrane index of each of the R columns
    sliced: list = field(default_factory=list)  # linear, fused rows: (start, length, up, down, owner)
    dense: list = field(default_factory=list)  # (membrane, 2-D weight delta, rows or None)
    bias: list = field(default_factory=list)  # (membrane, bias delta, rows or None)
    _cast: dict = field(default_factory=dict, repr=False)

    def cast(self, device, dtype) -> "LayerStack":
        """This stack on ``device``/``dtype`` (cached, so the hot path never converts)."""
        key = (str(device), dtype)
        if key not in self._cast:
            mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            self._cast[key] = LayerStack(
                self.module, self.weight_shape, self.combination, self.n, mv(self.up), mv(self.down),
                None if self.owner is None else self.owner.to(device),
                [(s, n, mv(u), mv(d), o.to(device)) for s, n, u, d, o in self.sliced],
                [(i, mv(w), r) for i, w, r in self.dense], [(i, mv(b), r) for i, b, r in self.bias])
        return self._cast[key]


def _as_lowrank(delta) -> Optional[LowRankDelta]:
    return delta if isinstance(delta, LowRankDelta) else None


def build_stacks(membranes: Sequence[Membrane], combination: str, shapes: Mapping[str, tuple]) -> dict:
    """module path → LayerStack for every UNet layer any membrane touches."""
    if combination not in COMBINATIONS:
        raise CombinationError(f"combination must be one of {COMBINATIONS}, found '{combination}'.")
    per_module = {}
    for i, mem in enumerate(membranes):
        for key, delta in mem.unet_deltas().items():
            name, offset = (key if isinstance(key, tuple) else (key, None))
            module, param = name.rsplit(".", 1)
            per_module.setdefault(module, []).append((i, param, offset, delta))
    n = len(membranes)
    stacks = {}
    for module, terms in per_module.items():
        wshape = tuple(shapes.get(module + ".weight", ()))
        stack = LayerStack(module, wshape, combination, n)
        if combination == "official":
            _stack_official(stack, terms, membranes)
        else:
            _stack_linear(stack, terms)
        stacks[module] = stack
    return stacks


def _stack_official(stack: LayerStack, terms, membranes) -> None:
    bad = [membranes[i].name for i, p, o, d in terms if p != "weight" or o is not None or _as_lowrank(d) is None]
    if bad:
        raise CombinationError(
            f"The official combination sums low-rank factors, but {bad[0]} has a dense, fused-row or bias delta "
            f"on {stack.module}. Choose the linear combination for it.")
    ranks = {d.rank for _, _, _, d in terms}
    if len(ranks) > 1:
        raise CombinationError(
            f"The official combination adds membranes factor by factor and needs equal ranks; {stack.module} has "
            f"ranks {sorted(ranks)}. Choose the linear combination.")
    r = ranks.pop()
    first = terms[0][3]
    up = torch.zeros(stack.n, first.up.shape[0], r)
    down = torch.zeros(stack.n, r, first.down.shape[1])
    for i, _, _, d in terms:
        up[i] += d.up.float()  # a membrane without this layer keeps zero factors, as in the reference sum
        down[i] += d.down.float()
    stack.up, stack.down = up, down


def _stack_linear(stack: LayerStack, terms) -> None:
    groups = {}
    for i, param, offset, delta in terms:
        rows = None if offset is None else (offset[1], offset[2])
        if offset is not None and offset[0] != 0:
            raise CombinationError(f"Only row slices of fused weights are supported, found {offset} on {stack.module}.")
        if param == "bias":
            stack.bias.append((i, delta.float().reshape(-1), rows))
        elif _as_lowrank(delta) is None:
            stack.dense.append((i, delta.float().reshape(delta.shape[0], -1), rows))
        else:
            groups.setdefault(rows, []).append((i, delta))
    for rows, items in groups.items():
        up = torch.cat([d.up.float() for _, d in items], dim=1)
        down = torch.cat([d.down.float() for _, d in items], dim=0)
        owner = torch.cat([torch.full((d.rank,), i, dtype=torch.long) for i, d in items])
        if rows is None:
            stack.up, stack.down, stack.owner = up, down, owner
        else:
            stack.sliced.append((rows[0], rows[1], up, down, owner))


def membrane_forward(x: torch.Tensor, y: torch.Tensor, stack: LayerStack, rates: torch.Tensor,
                     channels_first: bool = False) -> torch.Tensor:
    """y + ΔW(m_b)·x_b for every batch item b (rates: (B, n), one row per item).

    ``x``/``y`` are the layer's input and output: (B, …, in) / (B, …, out) for Linear, (B, C, H, W) for a
    1×1 convolution (``channels_first``). Dense k×k convolution deltas are the hook's job.
    """
    if channels_first:
        x, y = x.movedim(1, -1), y.movedim(1, -1)
    s = stack.cast(x.device, x.dtype)
    m = rates.to(device=x.device, dtype=x.dtype)
    b = x.shape[0]
    xf = x.reshape(b, -1, x.shape[-1])
    delta = torch.zeros(b, xf.shape[1], y.shape[-1], device=x.device, dtype=x.dtype)
    if s.combination == "official":
        n, r = s.up.shape[0], s.up.shape[2]
        h = (xf @ s.down.reshape(n * r, -1).T).reshape(b, -1, n, r)
        z = torch.einsum("blnr,bn->blr", h, m)  # (Σⱼ mⱼDⱼ) x
        up_eff = torch.einsum("bn,nor->bro", m, s.up)  # (Σᵢ mᵢUᵢ)ᵀ per item
        delta += torch.bmm(z, up_eff)
    else:
        if s.up is not None:
            delta += ((xf @ s.down.T) * m[:, s.owner][:, None, :]) @ s.up.T
        for start, length, up, down, owner in s.sliced:
            delta[..., start:start + length] += ((xf @ down.T) * m[:, owner][:, None, :]) @ up.T
        for i, w, rows in s.dense:
            part = m[:, i, None, None] * (xf @ w.T)
            if rows is None:
                delta += part
            else:
                delta[..., rows[0]:rows[0] + rows[1]] += part
        for i, bias, rows in s.bias:
            part = m[:, i, None, None] * bias
            if rows is None:
                delta += part
            else:
                delta[..., rows[0]:rows[0] + rows[1]] += part
    out = y + delta.reshape(y.shape)
    return out.movedim(-1, 1) if channels_first else out
