"""Getting weight deltas into the webui's UNet without fighting its LoRA system.

Three routes, chosen by ``backend.Backend.weight_route``:

* ``lora`` (A1111 with the built-in Lora extension): each eraser becomes a ``Network`` in
  ``networks.loaded_networks``. The Lora code then backs the layer up, merges every network in order
  (user LoRAs and ours), re-merges when the set or a multiplier changes, and restores from its backup
  when we leave — so weights are bit-identical to the checkpoint after a generation without erasers.
  (a1111_host.md §A2.5: editing weights in place behind Lora's back loses either its edit or ours.)
* ``direct`` (A1111 with Lora disabled): our own CPU backup per layer, applied before sampling and
  restored after the generation, on model load and on script reload.
* ``forge`` (Forge 1 / reForge / Classic / Forge 2): a clone of ``forge_objects.unet`` with
  ``add_patches`` "diff" patches; Forge resets ``forge_objects`` before every sampling pass, so nothing
  needs undoing.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

log = logging.getLogger(__name__)

PREFIX = "concept-erasers/"
KV = re.compile(r"(^|\.)attn2\.to_[kv]$")


@dataclass
class PlanEntry:
    """One set of deltas to apply: ΔW_key = multiplier · up @ down."""

    name: str  # unique, stable for identical content (it is the Lora system's cache key)
    label: str  # for logs and infotext, e.g. "uce(van gogh)"
    deltas: dict  # canonical key → LowRankDelta
    multiplier: float = 1.0
    source: str = ""  # file path, or "" when computed in this process
    meta: dict = field(default_factory=dict)


# -- the UNet ---------------------------------------------------------------------------------------
def diffusion_model_of(sd_model, route: str):
    if route == "forge":
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def text_projection_modules(diffusion_model) -> dict:
    """canonical weight key → the attn2 to_k / to_v Linear."""
    return {
        f"{name}.weight": module
        for name, module in diffusion_model.named_modules()
        if KV.search(name) and getattr(module, "weight", None) is not None
    }


def unet_shapes(sd_model, route: str) -> dict:
    """canonical key → shape of every UNet parameter (what adapter files are matched against)."""
    return {name: tuple(p.shape) for name, p in diffusion_model_of(sd_model, route).named_parameters()}


def modules_for(diffusion_model, keys) -> dict:
    """canonical weight key → the module owning it; KeyError naming the first missing layer."""
    out = {}
    for key in keys:
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        try:
            out[key] = diffusion_model.get_submodule(stem)
        except AttributeError:
            raise KeyError(f"Concept Erasers: layer {key} is not in this model.") from None
    return out


def _patcher_backups(sd_model) -> dict:
    """Forge keeps the unpatched weights of merged layers in ``backup`` (Forge 1) / ``lora_loader.backup`` (2)."""
    forge_objects = getattr(sd_model, "forge_objects", None)
    unet = getattr(forge_objects, "unet", None) if forge_objects is not None else None
    out = {}
    for holder in (unet, getattr(unet, "lora_loader", None)):
        backup = getattr(holder, "backup", None) if holder is not None else None
        if isinstance(backup, dict):
            out.update(backup)
    return out


def original_weights(sd_model, route: str, direct=None) -> dict:
    """The checkpoint's own text projections (never a LoRA- or eraser-merged copy), canonical keys.

    Includes ``label_emb.0.0.weight`` when present, so the core's family detection tells SDXL apart.
    """
    unet = diffusion_model_of(sd_model, route)
    patched = _patcher_backups(sd_model) if route == "forge" else {}
    out = {}
    for key, module in text_projection_modules(unet).items():
        weight = None
        if direct is not None:
            weight = direct.backups.get(id(module), (None, None))[1]
        if weight is None:
            weight = getattr(module, "network_weights_backup", None)  # the Lora extension's CPU copy
        if weight is None:
            backup = patched.get("diffusion_model." + key)
            weight = getattr(backup, "weight", backup) if backup is not None else None
        out[key] = (weight if weight is not None else module.weight).detach()
    for name, param in unet.named_parameters():
        if name.startswith("label_emb.0.0."):
            out[name] = param.detach()
            break
    return out


def delta_tensor(delta, multiplier: float, device=None, dtype=torch.float32) -> torch.Tensor:
    if isinstance(delta, torch.Tensor):  # a dense delta (some adapter formats)
        return (delta.to(device=device, dtype=torch.float32) * float(multiplier)).to(dtype)
    up = delta.up.to(device=device, dtype=torch.float32)
    down = delta.down.to(device=device, dtype=torch.float32)
    return ((up @ down) * float(multiplier)).to(dtype)


# -- route "lora": networks.loaded_networks --------------------------------------------------------
def layer_name(canonical_key: str) -> str:
    """``input_blocks.1.1.….attn2.to_k.weight`` → the Lora extension's ``network_layer_name``."""
    stem = canonical_key[: -len(".weight")] if canonical_key.endswith(".weight") else canonical_key
    return "diffusion_model_" + stem.replace(".", "_")


class DeltaModule:
    """A network module of the Lora extension's kind: ``calc_updown`` returns ΔW, ``forward`` adds x·ΔWᵀ."""

    def __init__(self, net, delta, key: str):
        self.network = net
        self.delta = delta
        self.sd_key = layer_name(key)
        self.network_key = key

    def multiplier(self) -> float:
        return float(self.network.unet_multiplier)

    def calc_updown(self, orig_weight):
        # float32: the host adds (W.to(updown.dtype) + ΔW) and casts back once
        updown = delta_tensor(self.delta, self.multiplier(), device=orig_weight.device)
        return updown.reshape(orig_weight.shape), None

    def forward(self, x, y):
        """``opts.lora_functional`` ("old method"): y + x·ΔWᵀ instead of merging."""
        w = delta_tensor(self.delta, self.multiplier(), device=x.device, dtype=x.dtype)
        if w.dim() != 2 or x.shape[-1] != w.shape[1]:  # a 1×1 conv (SPM proj_in on SD1): channels first
            return y + torch.nn.functional.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1))
        return y + x @ w.T


class _OnDisk(SimpleNamespace):
    """What the Lora code and other extensions read from ``net.network_on_disk``."""


def make_network(entry: PlanEntry, network_module=None):
    on_disk = _OnDisk(
        name=entry.name,
        filename=entry.source or entry.name,
        alias=entry.label,
        metadata={},
        shorthash="",
        hash="",
        is_safetensors=bool(entry.source),
    )
    on_disk.read_hash = lambda: None
    on_disk.get_alias = lambda: entry.label
    network_class = getattr(network_module, "Network", None)
    if network_class is not None:
        net = network_class(entry.name, on_disk)
    else:  # the same attributes the Lora extension's Network has
        net = SimpleNamespace(name=entry.name, network_on_disk=on_disk, modules={}, bundle_embeddings={}, mtime=None)
    net.mentioned_name = None  # keeps us out of the "Lora hashes" infotext
    net.te_multiplier = float(entry.multiplier)
    net.unet_multiplier = float(entry.multiplier)
    net.dyn_dim = None
    net.modules = {layer_name(key): DeltaModule(net, delta, key) for key, delta in entry.deltas.items()}
    net.bundle_embeddings = {}
    net.concept_erasers = True
    return net


def is_ours(net) -> bool:
    return getattr(net, "concept_erasers", False) or str(getattr(net, "name", "")).startswith(PREFIX)


class LoraRoute:
    def __init__(self, networks, network_module=None):
        self.networks = networks
        self.network_module = network_module

    def sync(self, sd_model, entries: list) -> None:
        """Replace our entries in ``loaded_networks`` (idempotent: same entries → same ``wanted_names``)."""
        loaded = self.networks.loaded_networks
        loaded[:] = [net for net in loaded if not is_ours(net)]
        if not entries:
            return
        unet = sd_model.model.diffusion_model
        modules = modules_for(unet, {key for entry in entries for key in entry.deltas})
        if any(getattr(m, "network_layer_name", None) is None for m in modules.values()):
            # normally done by the Lora extension on model load; needed before its merge can find layers
            assign = getattr(self.networks, "assign_network_names_to_compvis_modules", None)
            if assign is not None:
                assign(sd_model)
        for entry in entries:
            loaded.append(make_network(entry, self.network_module))

    def clear(self) -> None:
        loaded = self.networks.loaded_networks
        loaded[:] = [net for net in loaded if not is_ours(net)]


# -- route "direct": own backup --------------------------------------------------------------------
class DirectRoute:
    def __init__(self):
        #: id(module) → (module, CPU copy of the checkpoint weight)
        self.backups = {}
        self.applied = ()

    def apply(self, sd_model, entries: list) -> None:
        wanted = tuple((e.name, float(e.multiplier)) for e in entries)
        if wanted == self.applied:
            return
        self.restore()
        if not entries:
            return
        modules = modules_for(sd_model.model.diffusion_model, {key for entry in entries for key in entry.deltas})
        sums = {}
        with torch.no_grad():
            for entry in entries:
                for key, delta in entry.deltas.items():
                    module = modules[key]
                    add = delta_tensor(delta, entry.multiplier, device=module.weight.device)
                    sums[key] = sums[key] + add if key in sums else add
            for key, total in sums.items():
                module = modules[key]
                self.backups[id(module)] = (module, module.weight.detach().to("cpu", copy=True))
                base = module.weight.detach().to(torch.float32)
                module.weight.copy_((base + total.reshape(base.shape)).to(module.weight.dtype))
        self.applied = wanted

    def restore(self) -> None:
        with torch.no_grad():
            for module, backup in self.backups.values():
                module.weight.copy_(backup.to(module.weight.device))
        self.backups.clear()
        self.applied = ()


# -- route "forge": ModelPatcher.add_patches on a clone --------------------------------------------
def forge_patches(entry: PlanEntry, shapes: dict, dtype=torch.float32) -> dict:
    """``diffusion_model.<key>`` → ("diff" patch): a 1-tuple holding the dense ΔW in the weight's shape
    (strength is applied by Forge)."""
    return {
        "diffusion_model." + key: (delta_tensor(delta, 1.0, dtype=dtype).reshape(shapes[key]),)
        for key, delta in entry.deltas.items()
    }


def add_patches(unet, patches: dict, strength: float, filename: str):
    """Forge 2 takes keyword ``filename=``; Forge 1 / reForge / Classic take
    (patches, strength_patch, strength_model)."""
    try:
        params = inspect.signature(unet.add_patches).parameters
    except (TypeError, ValueError):
        params = {}
    if "filename" in params:
        return unet.add_patches(filename=filename, patches=patches, strength_patch=float(strength), strength_model=1.0)
    return unet.add_patches(patches, float(strength), 1.0)


def patch_dtype(unet) -> torch.dtype:
    """SDXL has 140 K/V matrices: keep the dense diffs in half precision when the UNet is stored in half.
    Forge 1 answers ``model_dtype()``; Forge 2's returns None (its KModel has no ``get_dtype``) and keeps the
    dtype in ``model.storage_dtype`` instead (which may also be a quantised format: then float32)."""
    dtype = getattr(unet, "model_dtype", lambda: None)()
    if dtype is None:
        dtype = getattr(getattr(unet, "model", None), "storage_dtype", None)
    return torch.float16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


class ForgeRoute:
    def apply(self, sd_model, entries: list) -> None:
        if not entries:
            return
        forge_objects = sd_model.forge_objects
        unet = forge_objects.unet.clone()
        dtype = patch_dtype(unet)
        shapes = {name: tuple(p.shape) for name, p in unet.model.diffusion_model.named_parameters()}
        for entry in entries:
            add_patches(unet, forge_patches(entry, shapes, dtype), entry.multiplier, entry.name)
        forge_objects.unet = unet
