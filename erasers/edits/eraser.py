"""An eraser: low-rank weight deltas for a model's text projections plus how they were made.

``compute_eraser`` is the host-agnostic entry point every adapter calls: weights in (canonical keys),
config + text encoder in, ``Eraser`` out. It never modifies the weights it is given.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .. import __version__
from ..config import ArgumentTypeError, EraserConfig
from ..errors import BadEraserFile, FamilyMismatch, NonFiniteResult, UnknownKeys
from ..files.families import Family, detect_family, layer_specs, parse_family
from ..lowrank import compress
from .methods import check_family, get_method

log = logging.getLogger(__name__)


@dataclass
class Eraser:
    deltas: dict  # canonical key → LowRankDelta
    family: Family
    config: dict  # the method config's to_dict()
    base_fingerprint: str = ""
    reconstruction_error: float = 0.0
    pack_version: str = __version__
    timings: dict = field(default_factory=dict)
    #: where it was loaded from (None when computed in this process)
    source: Optional[str] = None

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def concepts(self) -> list:
        return list(self.config.get("concepts", []))

    def keys(self) -> list:
        return sorted(self.deltas)

    def dense(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.deltas[key].dense(dtype)

    def check_factors(self) -> None:
        """Refuse deltas that cannot be applied: factors that are not 2-D, ranks of ``up`` and ``down`` that
        differ (a damaged file), or NaN/Inf anywhere. Cheap: reads the small factors, never forms ΔW."""
        where = f" in '{self.source}'" if self.source else ""
        for key, delta in sorted(self.deltas.items()):
            up, down = getattr(delta, "up", None), getattr(delta, "down", None)
            tensors = isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)
            if not tensors or up.dim() != 2 or down.dim() != 2:
                raise BadEraserFile(
                    f"Layer {key}{where}: expected 2-D lora_up (out×r) and lora_down (r×in) factors, found "
                    f"{_shape_of(up)} and {_shape_of(down)}. The file is damaged: re-create or re-download it."
                )
            if up.shape[1] != down.shape[0]:
                raise BadEraserFile(
                    f"Layer {key}{where}: lora_up has rank {up.shape[1]} ({tuple(up.shape)}) but lora_down has rank "
                    f"{down.shape[0]} ({tuple(down.shape)}); they must match. The file is damaged: re-create or "
                    f"re-download it. Nothing was applied."
                )
            if not delta.is_finite():
                raise NonFiniteResult(
                    f"Layer {key}{where}: the delta holds NaN or Inf; applying it would corrupt every image. "
                    f"Nothing was applied: re-compute the eraser (if it was just solved, raise λ)."
                )

    def check_model(
        self, shapes: Mapping[str, tuple], family: Optional[Family] = None, fingerprint: Optional[str] = None
    ) -> None:
        """Refuse a damaged eraser, a model of another family or without our layers; warn when the base differs."""
        self.check_factors()
        family = family or detect_family(shapes)
        where = f" ({self.source})" if self.source else ""
        if family != self.family:
            raise FamilyMismatch(
                f"This eraser{where} was made for {self.family.label} but the model is {family.label}. "
                f"Load it on a {self.family.label} model, or compute a new eraser for this one."
            )
        missing = [k for k in self.deltas if k not in shapes]
        if missing:
            raise UnknownKeys(
                f"The eraser{where} edits {len(missing)} layer(s) the model does not have: "
                f"{missing[:8]}{' …' if len(missing) > 8 else ''}. Expected layers of a {family.label} "
                f"model; the file may be for a different architecture variant."
            )
        bad = [k for k, d in self.deltas.items() if tuple(shapes[k][:2]) != d.shape]
        if bad:
            raise FamilyMismatch(
                f"The eraser{where} has deltas of the wrong shape for {bad[:4]}: expected "
                f"{[tuple(shapes[k][:2]) for k in bad[:4]]}, found {[self.deltas[k].shape for k in bad[:4]]}."
            )
        if fingerprint and self.base_fingerprint and fingerprint != self.base_fingerprint:
            log.warning(
                "Eraser%s was computed on a different base model (fingerprint %s, this model %s); "
                "it still applies, but its edit was solved for other weights.",
                where,
                self.base_fingerprint[:12],
                fingerprint[:12],
            )


def _shape_of(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class TimedEncoder:
    """Proxy that times text encoding, so benchmarks can split encoding from solving."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def _timed(self, fn, prompts):
        start = time.perf_counter()
        try:
            return check_encoding(fn(prompts), prompts)
        finally:
            self.seconds += time.perf_counter() - start

    def encode(self, prompts):
        return self._timed(self._encoder.encode, prompts)

    def __dir__(self):
        return dir(self._encoder)

    @property
    def encode_real_tokens(self):
        inner = getattr(self._encoder, "encode_real_tokens", None)
        return None if inner is None else (lambda prompts: self._timed(inner, prompts))


def check_encoding(encoding, prompts):
    """Refuse NaN/Inf text embeddings (a damaged text encoder), naming a prompt: otherwise the solve turns
    them into NaN deltas and the error would wrongly blame λ."""
    for name in ("hidden", "pooled"):
        value = getattr(encoding, name, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            rows = (~torch.isfinite(value.reshape(value.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
            prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
            example = prompts[rows[0]] if rows and rows[0] < len(prompts) else "?"
            raise NonFiniteResult(
                f"The text encoder produced NaN/Inf embeddings ({name}) for {len(rows)} prompt(s), e.g. "
                f"{str(example)[:60]!r}. Its weights are damaged (λ has nothing to do with it): reload or "
                f"re-download the model."
            )
    return encoding


def check_weights_finite(weights: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Refuse base weights holding NaN/Inf, naming the layer (the solve would make NaN deltas from them)."""
    for key in sorted(weights):
        w = weights[key]
        if w.is_floating_point() and not torch.isfinite(w).all():
            raise NonFiniteResult(
                f"Weight {key} of the {what} holds NaN or Inf: the model file is damaged (λ has nothing to do "
                f"with it). Re-download or re-save the model; nothing was computed."
            )


def fingerprint(weights: Mapping[str, torch.Tensor], keys=None) -> str:
    """Stable hash of the base layers an eraser was solved for (same for fp16 and fp32 loads)."""
    digest = hashlib.sha256()
    for key in sorted(keys if keys is not None else weights):
        w = weights[key]
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float16).cpu()
        digest.update(key.encode())
        digest.update(str(tuple(w.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def compute_eraser(config, encoder, weights: Mapping[str, torch.Tensor], family=None, progress=None) -> Eraser:
    """Solve ``config``'s closed form on ``weights`` (canonical key → tensor, any dtype/device).

    ``weights`` may hold the whole model or only its text projections; nothing is written to them.
    """
    if not isinstance(config, EraserConfig):
        raise ArgumentTypeError(
            f"config must be a method config such as UCEConfig(concepts=[...]), found {type(config).__name__} "
            f"{config!r:.80}."
        )
    method = get_method(config.method)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    family = parse_family(family) if isinstance(family, str) else (family or detect_family(shapes))
    check_family(method, family)
    specs = [s for s in layer_specs(shapes, family) if s.kind in method.kinds]
    if not specs:
        raise UnknownKeys(f"Found no text projection to edit in this {family.label} model.")
    expected = {s.in_features for s in specs if s.kind in ("k", "v", "text_in")}
    context_dim = getattr(encoder, "context_dim", None)
    if context_dim is not None and expected and context_dim not in expected:
        raise FamilyMismatch(
            f"The model is {family.label} and its text projections read {sorted(expected)}-wide embeddings, "
            f"but the text encoder ({getattr(encoder, 'family', '?')}) produces {context_dim}-wide ones. "
            f"Connect the text encoder that was loaded with this model."
        )
    base = {s.key: weights[s.key].detach().to("cpu", torch.float32) for s in specs}
    check_weights_finite(base)
    timed = TimedEncoder(encoder)
    started = time.perf_counter()
    deltas = method.erase(config, timed, base, specs, progress=progress)
    solved = time.perf_counter()
    worst = 0.0
    out = {}
    for key, delta in deltas.items():
        delta = delta.to(torch.float32)  # storage precision; the solves ran in float64
        if not delta.is_finite():
            raise NonFiniteResult(
                f"{method.title} produced NaN/Inf for layer {key} from finite weights and embeddings: the system "
                f"is ill-conditioned for these concepts. Raise λ (lam) or lower the erase scale."
            )
        if config.rank_cap is not None and delta.rank > config.rank_cap:
            delta, err = compress(delta, rank_cap=config.rank_cap)
            worst = max(worst, err)
            if not delta.is_finite() or not math.isfinite(err):  # the SVD of a nearly singular core can overflow
                raise NonFiniteResult(
                    f"Compressing layer {key} to rank {config.rank_cap} produced NaN/Inf. Save without a rank "
                    f"cap, or raise λ (lam) so the edit is better conditioned."
                )
        out[key] = delta
    if config.rank_cap is not None:
        log.warning("Rank cap %d: worst relative reconstruction error of a layer's delta %.3g", config.rank_cap, worst)
    # fingerprint the layers it edits: what ``check_model`` compares when the eraser is applied
    eraser = Eraser(out, family, config.to_dict(), fingerprint(base, keys=sorted(out)), worst)
    eraser.timings = {
        "encode_s": timed.seconds,
        "solve_s": solved - started - timed.seconds,
        "compress_s": time.perf_counter() - solved,
    }
    return eraser


def compute_eraser_by_stream(
    config, encoders: Mapping[str, object], weights: Mapping[str, torch.Tensor], streams: Mapping[str, str], family
) -> Eraser:
    """One eraser for a model whose edited Linears read *different* text streams (HiDream-I1: each caption
    projection its own Llama layer, erasers/families/hidream.py): ``compute_eraser`` once per stream, on that
    stream's Linears with ``encoders[stream]``, merged. Exact for methods that solve each Linear on its own
    (UCE, SPEED, MACE-CFR); RECE derives its adversarial c′ per stream.

    ``streams``: canonical key → stream name; every stream needs an encoder."""
    groups: dict = {}
    for key, stream in streams.items():
        groups.setdefault(stream, []).append(key)
    missing = sorted(set(groups) - set(encoders))
    if missing:
        raise ArgumentTypeError(f"No text encoder for the streams {missing[:5]} (have {sorted(encoders)[:5]}…).")
    parts = [
        compute_eraser(config, encoders[stream], {k: weights[k] for k in keys}, family=family)
        for stream, keys in groups.items()
    ]
    deltas = {k: d for part in parts for k, d in part.deltas.items()}
    base = {k: weights[k] for k in deltas}
    eraser = Eraser(
        deltas,
        parts[0].family,
        config.to_dict(),
        fingerprint(base, keys=sorted(deltas)),
        max(p.reconstruction_error for p in parts),
    )
    eraser.timings = {name: sum(p.timings.get(name, 0.0) for p in parts) for name in parts[0].timings}
    eraser.timings["streams"] = len(parts)
    return eraser
