"""SPM membranes at run time: per-prompt rates, the two combination rules, the per-item forward.

A membrane (or any erasure LoRA) is a set of low-rank deltas ΔWᵢ = UᵢDᵢ (α/r folded into U) opened by a
``Gate``: "always" (rate = strength) or "facilitated transport" (rate = strength · m(p), transport.py).
Several membranes with rates mᵢ combine as (spm.md §4.2):
    official:  ΔW = (Σᵢ mᵢUᵢ)(Σⱼ mⱼDⱼ)   — both factors scaled, summed before the product: one membrane
               acts at m², several produce cross terms mᵢmⱼUᵢDⱼ (reproduces the reference images);
    linear:    ΔW = Σᵢ mᵢ UᵢDᵢ          — each membrane at rate m, independently.
Because m depends on the prompt, the delta is never baked into W: ``membrane_forward`` adds ΔW(m_b)·x_b
per batch item b inside the host's forward, so cond and uncond rows of one item share that item's m.
The rates are folded into the factors once per prompt (``LayerStack.folded``): one low-rank product per
layer whatever the number of membranes. When every row has the same rates (one prompt, both CFG halves)
ΔW(m) is one fixed matrix for the call, and layers that see many tokens run on W + ΔW(m), built per call
and dropped after it (``LayerStack.folded_weight``; the hooks swap W by reference and never write it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ..errors import EraserError
from ..lowrank import LowRankDelta
from ..text import check_prompts
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
            self.cache.update(
                zip(todo, self.compute(self.encoder.encode(todo) if self._needs_text() else None, len(todo)))
            )
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
    _folded: dict = field(default_factory=dict, repr=False)

    def folded(self, key: tuple) -> tuple:
        """((U, D) or None, [(start, length, U, D) per fused-row slice]) with the rates folded in, cached
        per rate matrix ``key`` (one entry per prompt in practice), in this stack's device/dtype."""
        if key not in self._folded:
            if len(self._folded) >= 32:  # a long session of different prompts: keep memory bounded
                self._folded.clear()
            uniform = key[0] == "uniform"
            work = torch.float64 if self.up is not None and self.up.dtype == torch.float64 else torch.float32
            m = torch.tensor(key[1], dtype=work, device=self._device())
            fold = lambda up, down, owner: tuple(  # noqa: E731
                t.to(self.up.dtype if self.up is not None else up.dtype).contiguous()
                for t in _fold_factors(up.to(work), down.to(work), owner, self.combination, m, uniform)
            )
            main = fold(self.up, self.down, self.owner) if self.up is not None else None
            sliced = [(st, n, *fold(u, d, o)) for st, n, u, d, o in self.sliced]
            self._folded[key] = (main, sliced)
        return self._folded[key]

    def folded_weight(self, weight: torch.Tensor, key: tuple) -> torch.Tensor:
        """W + ΔW(m) for a uniform rate row (``key``), as a new tensor shaped like ``weight``: the same
        matrix as the low-rank path adds, folded into the weight for this call only (W itself is never
        written). Cheaper than the low-rank path when the layer sees more tokens than its weight has
        rows/columns: it reads W once instead of the input and the output."""
        main, sliced = self.folded(key)
        w = weight.reshape(weight.shape[0], -1)
        out = torch.addmm(w, main[0], main[1]) if main is not None and main[0].shape[1] else w.clone()
        for start, length, up, down in sliced:
            if up.shape[1]:
                out[start : start + length].addmm_(up, down)
        for i, delta, rows in self.dense:
            target = out if rows is None else out[rows[0] : rows[0] + rows[1]]
            target.add_(delta, alpha=float(key[1][i]))
        return out.reshape(weight.shape)

    def _device(self):
        for t in (self.up, *(sl[2] for sl in self.sliced)):
            if t is not None:
                return t.device
        return "cpu"

    def cast(self, device, dtype) -> "LayerStack":
        """This stack on ``device``/``dtype`` (cached, so the hot path never converts)."""
        key = (str(device), dtype)
        if key not in self._cast:
            mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
            self._cast[key] = LayerStack(
                self.module,
                self.weight_shape,
                self.combination,
                self.n,
                mv(self.up),
                mv(self.down),
                None if self.owner is None else self.owner.to(device),
                [(s, n, mv(u), mv(d), o.to(device)) for s, n, u, d, o in self.sliced],
                [(i, mv(w), r) for i, w, r in self.dense],
                [(i, mv(b), r) for i, b, r in self.bias],
            )
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
            name, offset = key if isinstance(key, tuple) else (key, None)
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
            f"on {stack.module}. Choose the linear combination for it."
        )
    ranks = {d.rank for _, _, _, d in terms}
    if len(ranks) > 1:
        raise CombinationError(
            f"The official combination adds membranes factor by factor and needs equal ranks; {stack.module} has "
            f"ranks {sorted(ranks)}. Choose the linear combination."
        )
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
            raise CombinationError(
                f"Only row slices of fused weights are supported, found {offset} on {stack.module}."
            )
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


def rates_key(rates: torch.Tensor) -> tuple:
    """Cache key of a (B, n) rate matrix: ("uniform", row) when every row is equal (one prompt, both CFG
    halves: the delta is then one fixed low-rank matrix for the whole batch), else every row."""
    rows = tuple(tuple(r) for r in rates.detach().to("cpu", torch.float64).tolist())
    return ("uniform", rows[0]) if rows and all(r == rows[0] for r in rows) else ("rows", rows)


def _fold_factors(up, down, owner, combination: str, m: torch.Tensor, uniform: bool) -> tuple:
    """(U, D) with the rates folded in, so ΔW(m) = U·D is one low-rank product per layer:
    official: U = Σᵢ mᵢUᵢ, D = Σⱼ mⱼDⱼ (spm.md §4.2 — the cross terms come out of the product);
    linear:   U = [m₁U₁ … mₙUₙ] (columns of zero-rate membranes dropped), D = [D₁; …; Dₙ].
    ``m`` is (n,) when ``uniform`` (2-D factors) or (B, n) (factors batched per row)."""
    if combination == "official":
        if uniform:
            return torch.einsum("n,nor->or", m, up), torch.einsum("n,nri->ri", m, down)
        return torch.einsum("bn,nor->bor", m, up), torch.einsum("bn,nri->bri", m, down)
    if uniform:
        scale = m[owner]
        keep = scale != 0
        return (up * scale)[:, keep], down[keep]
    return up[None] * m[:, owner][:, None, :], down


def membrane_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    stack: LayerStack,
    rates: torch.Tensor,
    channels_first: bool = False,
    key: Optional[tuple] = None,
) -> torch.Tensor:
    """y + ΔW(m_b)·x_b for every batch item b (rates: (B, n), one row per item).

    ``x``/``y`` are the layer's input and output: (B, …, in) / (B, …, out) for Linear, (B, C, H, W) for a
    1×1 convolution (``channels_first``). Dense k×k convolution deltas are the hook's job. The rates are
    folded into the factors once per rate matrix (``key``, see ``rates_key``; cached on the stack), so a
    call costs one skinny matmul over x and one rank-r update accumulated straight into the output (no
    full-size temporaries); under autograd a new tensor is returned instead.
    """
    s = stack.cast(x.device, x.dtype)
    key = rates_key(rates) if key is None else key
    uniform = key[0] == "uniform"
    folded = s.folded(key)
    b = x.shape[0]
    inplace = not torch.is_grad_enabled()
    if channels_first:  # (B, C, H, W) → (B, C, L): views, the token axis last
        xf, out = x.reshape(b, x.shape[1], -1), y.reshape(b, y.shape[1], -1)
    elif uniform:  # one matrix for every token of every item: plain 2-D matmuls
        xf, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        xf, out = x.reshape(b, -1, x.shape[-1]), y.reshape(b, -1, y.shape[-1])
    if not inplace or out.data_ptr() != y.data_ptr():
        out = out.clone()
    main, sliced = folded
    if main is not None:
        _add_lowrank(out, xf, main[0], main[1], uniform, channels_first)
    for start, length, up, down in sliced:
        _add_lowrank(out.narrow(-2 if channels_first else -1, start, length), xf, up, down, uniform, channels_first)
    if s.dense or s.bias:
        if uniform and not channels_first:
            out, xf = out.reshape(b, -1, out.shape[-1]), xf.reshape(b, -1, xf.shape[-1])
        _dense_terms(xf, out, s, rates.to(device=x.device, dtype=x.dtype), channels_first)
    return out.reshape(y.shape)


def _add_lowrank(out, xf, up, down, uniform: bool, channels_first: bool) -> None:
    """out += U·D·x in place (channels-last: x·Dᵀ·Uᵀ); U, D 2-D when ``uniform``, else batched per item.
    ``out`` is the hook's own clone under autograd, so in-place accumulation is safe there too."""
    if up.shape[-1] == 0:  # every membrane on this layer is shut for this prompt
        return
    if channels_first:
        out.baddbmm_(up.expand(xf.shape[0], -1, -1) if uniform else up, down @ xf)  # (B, r, L) in the middle
    elif uniform:
        out.addmm_(xf @ down.T, up.T)  # (N, r) in the middle
    else:
        out.baddbmm_(xf @ down.transpose(-1, -2), up.transpose(1, 2))


def _dense_terms(xf, out, s: LayerStack, m, channels_first: bool) -> None:
    """Σᵢ mᵢ ΔWᵢ x of dense and bias deltas (linear combination only), accumulated into ``out``
    (channels-last (B, L, ·) or channels-first (B, ·, L))."""

    def rows(t, start, length):
        return t.narrow(1 if channels_first else 2, start, length)

    for i, w, rng in s.dense:
        part = (w @ xf) if channels_first else (xf @ w.T)
        part = part * m[:, i, None, None]
        (out if rng is None else rows(out, *rng)).add_(part)
    for i, bias, rng in s.bias:
        shaped = bias[None, :, None] if channels_first else bias[None, None, :]
        (out if rng is None else rows(out, *rng)).add_(m[:, i, None, None] * shaped)
