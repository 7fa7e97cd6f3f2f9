"""Removable torch forward hooks that add gated membrane/LoRA deltas per batch item.

Host-neutral: given the root module and a name map (canonical module path → the host's module path),
``MembraneHooks`` hooks exactly the layers the stacks touch. The host sets ``rates`` (B, n) before each
forward (one row per batch row) and ``remove()`` restores the module's behaviour; weights are never
written, so removal is bit-exact by construction.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .spm import LayerStack, membrane_forward


def _kxk_terms(stack: LayerStack) -> list:
    """Dense per-membrane deltas of a k×k convolution (linear combination only), in the weight's shape."""
    terms = [(i, w) for i, w, rows in stack.dense]
    if stack.up is not None:
        for i in stack.owner.unique().tolist():
            cols = stack.owner == i
            terms.append((i, stack.up[:, cols] @ stack.down[cols]))
    return [(i, w.reshape(stack.weight_shape)) for i, w in terms]


class MembraneHooks:
    def __init__(self, root: torch.nn.Module, stacks: Mapping[str, LayerStack],
                 module_name: Callable[[str], Optional[str]] = lambda path: path):
        self.rates: Optional[torch.Tensor] = None
        self.handles = []
        missing = []
        for path, stack in stacks.items():
            name = module_name(path)
            try:
                module = root.get_submodule(name) if name is not None else None
            except AttributeError:
                module = None
            if module is None:
                missing.append(path)
                continue
            self.handles.append(module.register_forward_hook(self._make_hook(stack, module)))
        self.missing = missing

    def _make_hook(self, stack: LayerStack, module: torch.nn.Module):
        weight = getattr(module, "weight", None)
        four_d = weight is not None and weight.dim() == 4
        kxk = four_d and tuple(weight.shape[2:]) != (1, 1)
        conv_terms = _kxk_terms(stack) if kxk else []
        casts = {}

        def hook(mod, args, output):
            rates = self.rates
            if rates is None:
                return None
            x = args[0]
            if rates.shape[0] != x.shape[0]:
                raise RuntimeError(f"membrane rates have {rates.shape[0]} rows but {stack.module} sees a batch of "
                                   f"{x.shape[0]}; the host must set one row per batch row.")
            if not kxk:
                return membrane_forward(x, output, stack, rates, channels_first=four_d)
            key = (x.device, x.dtype)
            if key not in casts:
                casts[key] = [(i, w.to(device=x.device, dtype=x.dtype)) for i, w in conv_terms]
            m = rates.to(device=x.device, dtype=x.dtype)
            out = output
            for i, w in casts[key]:
                out = out + m[:, i, None, None, None] * F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation,
                                                                 mod.groups)
            for i, bias, rows in stack.bias:
                out = out + m[:, i, None, None, None] * bias.to(out)[None, :, None, None]
            return out

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.rates = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
