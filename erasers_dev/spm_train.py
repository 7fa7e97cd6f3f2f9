"""Latent-anchoring SPM trainer (spm.md §5) and its ESD-x special case, for diffusers-style UNets.

Trains low-rank adapters ΔW = (α/r)·U D on chosen UNet layers through forward hooks (W₀ frozen and never
written) and saves them in the kohya/SPM layout (``lora_unet_<diffusers path>`` lora_down / lora_up /
alpha), which ``erasers.membranes.formats`` reads back. One iteration (spm.md §5.2):

* x_t on-policy: k ~ U{1 … K−1} DDIM steps of K from Gaussian noise with the adapter on, the target
  prompt and CFG ``rollout_guidance`` (step 2);
* erase loss (step 6; ESD's negative guidance):
  L_erase = ‖ε_θ+Δ(x_t, c_tar, t) − [ε_θ(x_t, c_neu, t) − η (ε_θ(x_t, c_pos, t) − ε_θ(x_t, c_neu, t))]‖²,
  positive = target; neutral = the empty prompt (ESD) or a surrogate concept (SPM's ``neutral``);
* anchoring loss (step 8): L_anchor = ‖ε_θ+Δ(x_t, a, t) − ε_θ(x_t, a, t)‖² over S anchor conditions;
* L = L_erase + λ·L_anchor (``action="erase_with_la"``); ``action="erase"`` is L_erase alone (ESD).

Anchors are prompts of *other concepts* (spm.md §5.2 suggests a cleaned-up trainer anchor real
conditions): the reference draws random directions with the target's norm, but in an encoder whose rows
share a large common component (the shapes encoder, cosine ≈ 0.97 between concepts) such directions lie
far from every prompt and anchor nothing that is ever sampled.

Layers: ``"spm"`` = the 12 Linear / 1×1-conv layers of every transformer (§2.2, rank 1 by default);
``"esd-x"`` = the cross-attention projections that read the text (attn2 to_k / to_v).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F

from erasers.config import ConfigError, SerialisedConfig

log = logging.getLogger(__name__)

ACTIONS = ("erase", "erase_with_la")
#: module-path suffixes per layer set (selected by path, never by class name)
LAYER_SETS = {
    "spm": re.compile(
        r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|"
        r"ff\.net\.0\.proj|ff\.net\.2))$"
    ),
    "esd-x": re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn2\.to_(k|v)$"),
}


@dataclass
class SPMTrainConfig(SerialisedConfig):
    method: ClassVar[str] = "spm-train"

    #: prompts naming the concept (c_tar = c_pos); one pair per prompt with ``neutrals``
    targets: list = field(default_factory=list)
    #: one neutral per target or one for all; "" = the unconditional prompt (ESD)
    neutrals: list = field(default_factory=lambda: [""])
    #: anchor prompts (other concepts) for the latent-anchoring loss
    anchors: list = field(default_factory=list)
    #: the concept names written to the file's ``prompts`` metadata (facilitated transport reads them)
    concepts: list = field(default_factory=list)
    action: str = "erase_with_la"
    layers: str = "spm"
    rank: int = 1
    alpha: float = 1.0
    #: η of the erase target (spm.md ``guidance_scale``, ESD's negative-guidance scale)
    eta: float = 1.0
    #: λ (``la_strength``); the reference's 1000 is for SD1.4 latents and "should be tuned" for others
    la_strength: float = 1.0
    iterations: int = 300
    lr: float = 1e-3
    batch_size: int = 4
    anchor_batch: int = 4
    #: K of the on-policy rollout (the reference's max_denoising_steps 30)
    rollout_steps: int = 30
    rollout_guidance: float = 3.0
    seed: int = 0

    def __post_init__(self):
        self.targets = [t for t in self.targets if t and t.strip()]
        if not self.targets:
            raise ConfigError("spm-train: give at least one target prompt (the concept to erase).")
        if len(self.neutrals) not in (1, len(self.targets)):
            raise ConfigError(
                f"spm-train: expected one neutral or one per target ({len(self.targets)}), found {len(self.neutrals)}."
            )
        if self.action not in ACTIONS:
            raise ConfigError(f"spm-train: action must be one of {ACTIONS}, found '{self.action}'.")
        if self.action == "erase_with_la" and not self.anchors:
            raise ConfigError("spm-train: latent anchoring needs anchor prompts (other concepts to keep).")
        if self.layers not in LAYER_SETS:
            raise ConfigError(f"spm-train: layers must be one of {sorted(LAYER_SETS)}, found '{self.layers}'.")
        for name in ("rank", "iterations", "batch_size", "anchor_batch"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ConfigError(f"spm-train: {name} must be a whole number ≥ 1, found {getattr(self, name)!r}.")
        if int(self.rollout_steps) != self.rollout_steps or self.rollout_steps < 2:
            raise ConfigError(f"spm-train: rollout_steps must be a whole number ≥ 2, found {self.rollout_steps!r}.")
        for name in ("alpha", "eta", "la_strength", "lr", "rollout_guidance"):
            value = getattr(self, name)
            if not (value >= 0) or math.isinf(value):
                raise ConfigError(f"spm-train: {name} must be a finite number ≥ 0, found {value!r}.")

    def neutral_for(self, i: int) -> str:
        return self.neutrals[0] if len(self.neutrals) == 1 else self.neutrals[i]


class Adapter(torch.nn.Module):
    """ΔW = (α/r) U D on one Linear or 1×1 Conv2d, added to its output by a forward hook."""

    def __init__(self, module: torch.nn.Module, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.conv = isinstance(module, torch.nn.Conv2d)
        if self.conv and tuple(module.kernel_size) != (1, 1):
            raise ConfigError(f"spm-train: only 1×1 convolutions can carry a membrane, found {module.kernel_size}.")
        w = module.weight
        out_f, in_f = w.shape[0], w.shape[1]
        rank = min(rank, in_f, out_f)
        # the reference's init (§2.1): down Kaiming-uniform (a = √5), up zero → a fresh adapter is the identity
        bound = 1.0 / math.sqrt(in_f)
        self.down = torch.nn.Parameter((torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound)
        self.up = torch.nn.Parameter(torch.zeros(out_f, rank))
        self.scale = alpha / rank
        self.alpha = alpha
        self.enabled = True
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not self.enabled:
            return output
        x = args[0]
        if self.conv:
            delta = torch.einsum("or,ri,bihw->bohw", self.up, self.down, x)
        else:
            delta = F.linear(F.linear(x, self.down), self.up)
        return output + self.scale * delta

    def remove(self) -> None:
        self.handle.remove()


class Adapters:
    """Every adapter on a UNet, switched on and off together (the reference's network context)."""

    def __init__(self, unet: torch.nn.Module, layers: str, rank: int, alpha: float, seed: int = 0):
        from erasers_diffusers.apply import unet_canonical_names

        gen = torch.Generator().manual_seed(seed)
        pattern = LAYER_SETS[layers]
        to_canon = unet_canonical_names(unet)
        self.adapters: Dict[str, Adapter] = {}
        #: diffusers module path → canonical (LDM) module path, for the file's key names
        self.canonical: Dict[str, str] = {}
        for name, module in unet.named_modules():
            if pattern.search(name) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                self.adapters[name] = Adapter(module, rank, alpha, gen)
                self.canonical[name] = to_canon.get(name + ".weight", name + ".weight")[: -len(".weight")]
        if not self.adapters:
            raise ConfigError(f"spm-train: no '{layers}' layers found in this UNet ({type(unet).__name__}).")

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in (a.down, a.up)]

    def enable(self, on: bool) -> None:
        for a in self.adapters.values():
            a.enabled = on

    def remove(self) -> None:
        for a in self.adapters.values():
            a.remove()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """kohya/SPM layout: lora_down / lora_up (4-D for 1×1 convs) / alpha per ``lora_unet_<LDM path>``.

        LDM-style names (``keys.kohya_name``), as kohya's own trainers write them: they resolve on any UNet
        layout, whereas diffusers spellings are read assuming SD's two layers per block.
        """
        from erasers.files.keys import kohya_name

        out = {}
        for name, a in sorted(self.adapters.items()):
            stem = kohya_name(self.canonical[name])
            down, up = a.down.detach().float().clone(), a.up.detach().float().clone()
            if a.conv:
                down, up = down[:, :, None, None], up[:, :, None, None]
            out[f"{stem}.lora_down.weight"] = down.contiguous()
            out[f"{stem}.lora_up.weight"] = up.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(float(a.alpha))
        return out


def erase_target(eps_pos: torch.Tensor, eps_neu: torch.Tensor, eta: float) -> torch.Tensor:
    """ε_neu − η (ε_pos − ε_neu): spm.md §5.2 step 6 (ESD eq. 5 with ε_neu = ε(x_t, ∅))."""
    return eps_neu - eta * (eps_pos - eps_neu)


@torch.no_grad()
def rollout(
    unet, scheduler, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, k: int, guidance: float
) -> torch.Tensor:
    """k DDIM steps from ``x`` with CFG (the adapter as currently switched)."""
    for t in scheduler.timesteps[:k]:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = eps.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def train(pipe, config: SPMTrainConfig, progress=None) -> Adapters:
    """Train adapters on ``pipe.unet`` (frozen) with ``pipe.encode_prompts``; returns them still hooked."""
    unet = pipe.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    adapters = Adapters(unet, config.layers, config.rank, config.alpha, config.seed)
    optimiser = torch.optim.AdamW(adapters.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    pairs = [(t, config.neutral_for(i)) for i, t in enumerate(config.targets)]
    texts = sorted({t for pair in pairs for t in pair} | set(config.anchors) | {""})
    with torch.no_grad():
        table = dict(zip(texts, pipe.encode_prompts(texts)))
    size = pipe.image_size
    channels = unet.config.in_channels
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(config.rollout_steps)
    started = time.perf_counter()
    for step in range(int(config.iterations)):
        idx = torch.randint(len(pairs), (config.batch_size,), generator=gen).tolist()
        c_tar = torch.stack([table[pairs[i][0]] for i in idx])
        c_neu = torch.stack([table[pairs[i][1]] for i in idx])
        uncond = table[""].expand_as(c_tar)
        k = int(torch.randint(1, config.rollout_steps, (1,), generator=gen))
        noise = torch.randn(config.batch_size, channels, size, size, generator=gen)
        adapters.enable(True)
        x_t = rollout(unet, scheduler, noise, c_tar, uncond, k, config.rollout_guidance)
        t = scheduler.timesteps[k]
        with torch.no_grad():
            adapters.enable(False)
            eps_pos, eps_neu = unet(
                torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([c_tar, c_neu])
            ).sample.chunk(2)
            target = erase_target(eps_pos, eps_neu, config.eta)
        if config.action == "erase_with_la":
            a_idx = torch.randint(len(config.anchors), (config.anchor_batch,), generator=gen).tolist()
            c_anc = torch.stack([table[config.anchors[i]] for i in a_idx])
            x_a = x_t.repeat((config.anchor_batch + config.batch_size - 1) // config.batch_size, 1, 1, 1)
            x_a = x_a[: config.anchor_batch]
            with torch.no_grad():
                eps_anchor = unet(x_a, t, encoder_hidden_states=c_anc).sample
        adapters.enable(True)
        loss_erase = F.mse_loss(unet(x_t, t, encoder_hidden_states=c_tar).sample, target)
        loss = loss_erase
        loss_anchor = torch.zeros(())
        if config.action == "erase_with_la":
            loss_anchor = F.mse_loss(unet(x_a, t, encoder_hidden_states=c_anc).sample, eps_anchor)
            loss = loss + config.la_strength * loss_anchor
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(step + 1, config.iterations, loss_erase.item(), loss_anchor.item())
    log.info("spm-train: %d iterations in %.0f s", config.iterations, time.perf_counter() - started)
    return adapters


def save(adapters: Adapters, config: SPMTrainConfig, path: str, overwrite: bool = False) -> str:
    """The adapters as a kohya/SPM-layout file; membranes carry the SPM ``prompts``/``rank``/``alpha`` header.
    Written atomically; an existing file is replaced only with ``overwrite``."""
    from erasers.files.writing import save_safetensors_atomic

    metadata = {"erasers.train_config": config.to_json(), "ss_network_module": "networks.lora"}
    if config.action == "erase_with_la" or config.layers == "spm":
        metadata.update(
            {
                "prompts": ",".join(config.concepts or config.targets[:1]),
                "rank": str(config.rank),
                "alpha": str(config.alpha),
            }
        )
    return save_safetensors_atomic(adapters.state_dict(), path, metadata=metadata, overwrite=overwrite)


def shapes_config(concept: str, kind: str = "spm", **overrides) -> SPMTrainConfig:
    """Settings for the shapes world: targets "a <colour> <concept>" (+ the bare word); SPM maps them to the
    same colour of the axis' anchor concept and anchors every prompt of the other concepts; ESD-x keeps
    ESD's neutral (the empty prompt) and no anchoring."""
    from .shapes import world

    axis = "shape" if concept in world.SHAPES else "colour"
    if axis != "shape":
        raise ConfigError(f"spm-train shapes settings erase a shape, found '{concept}'.")
    others = [s for s in world.SHAPES if s != concept]
    targets = [concept] + [f"a {c} {concept}" for c in world.COLOURS]
    # the shipped files' budget (2 shared CPU cores): 150 iterations, batch 2, 10-step rollouts, lr 2e-3
    budget = dict(iterations=150, batch_size=2, rollout_steps=10, lr=2e-3)
    if kind == "spm":
        neutrals = [others[0]] + [f"a {c} {others[0]}" for c in world.COLOURS]
        anchors = [f"a {c} {s}" for s in others for c in world.COLOURS] + others
        base = dict(
            budget,
            targets=targets,
            neutrals=neutrals,
            anchors=anchors,
            concepts=[concept],
            action="erase_with_la",
            layers="spm",
            rank=1,
            la_strength=5.0,
        )
    elif kind == "esd-x":
        base = dict(budget, targets=targets, neutrals=[""], concepts=[concept], action="erase", layers="esd-x", rank=4)
    else:
        raise ConfigError(f"spm-train: kind must be 'spm' or 'esd-x', found '{kind}'.")
    return SPMTrainConfig(**{**base, **overrides})


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m erasers_dev.spm_train",
        description="Train an SPM membrane or an ESD-x LoRA on the shapes model. The "
        "defaults reproduce the shipped erasers_dev/shapes/weights/"
        "{spm_circle_membrane,esdx_circle_lora}.safetensors.",
    )
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--kind", default="spm", choices=("spm", "esd-x"))
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--la-strength", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rollout-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    from .shapes import load_default

    torch.set_num_threads(max(1, args.threads))
    overrides = {
        k: v
        for k, v in (
            ("iterations", args.iterations),
            ("la_strength", args.la_strength),
            ("lr", args.lr),
            ("rollout_steps", args.rollout_steps),
            ("batch_size", args.batch_size),
        )
        if v is not None
    }
    config = shapes_config(args.concept, args.kind, **overrides)
    pipe = load_default().clone()
    every = max(1, config.iterations // 10)

    def report(step, total, l_erase, l_anchor):
        if step % every == 0 or step == total:
            print(f"  {step}/{total}  erase {l_erase:.4f}  anchor {l_anchor:.5f}", flush=True)

    started = time.perf_counter()
    adapters = train(pipe, config, report)
    path = save(adapters, config, args.out)
    print(
        f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB, {len(adapters.adapters)} layers) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
