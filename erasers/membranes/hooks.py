"""Removable torch forward hooks that add gated membrane/LoRA deltas per batch item.

Host-neutral: given the root module and a name map (canonical module path → the host's module path),
``MembraneHooks`` hooks exactly the layers the stacks touch. The host sets ``rates`` (B, n) before each
forward (one row per batch row) and ``remove()`` restores the module's behaviour; weights are never
written, so removal is bit-exact by construction. With one rate row for the whole batch a layer with
many tokens runs on a folded weight W + ΔW(m) for that call (a forward pre-hook swaps the weight object,
the forward hook — also called when the forward raises — puts the host's own object back).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from .spm import LayerStack, membrane_forward, rates_key


def _kxk_terms(stack: LayerStack) -> list:
    """Dense per-membrane deltas of a k×k convolution (linear combination only), in the weight's shape."""
    terms = [(i, w) for i, w, rows in stack.dense]
    if stack.up is not None:
        for i in stack.owner.unique().tolist():
            cols = stack.owner == i
            terms.append((i, stack.up[:, cols] @ stack.down[cols]))
    return [(i, w.reshape(stack.weight_shape)) for i, w in terms]


class MembraneHooks:
    def __init__(
        self,
        root: torch.nn.Module,
        stacks: Mapping[str, LayerStack],
        module_name: Callable[[str], Optional[str]] = lambda path: path,
    ):
        self._rates: Optional[torch.Tensor] = None
        self._key: Optional[tuple] = None
        self._shut = True  # no rates set yet: every membrane is shut (the hooks step aside)
        self.handles = []
        self.modules = []  # (canonical path, module) of every hooked layer
        self.fold = True  # one-prompt batches may run on a per-call folded weight (see ``pre``)
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
            self.modules.append((path, module))
            pre, post = self._make_hook(stack, module)
            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post, always_call=True))
        self.missing = missing

    @property
    def rates(self) -> Optional[torch.Tensor]:
        return self._rates

    @rates.setter
    def rates(self, value: Optional[torch.Tensor]) -> None:
        """(B, n) rates for the next forward; the fold key is computed once here, not in every layer."""
        self._rates = value
        self._key = None if value is None else rates_key(value)
        # all rates 0: every membrane is shut and the hooks step aside (bit-identical to no hooks)
        self._shut = value is None or not bool(torch.count_nonzero(value))

    def _make_hook(self, stack: LayerStack, module: torch.nn.Module):
        weight = getattr(module, "weight", None)
        four_d = weight is not None and weight.dim() == 4
        kxk = four_d and tuple(weight.shape[2:]) != (1, 1)
        conv_terms = _kxk_terms(stack) if kxk else []
        casts = {}
        swapped = []  # original weight objects while a call runs on a folded weight (a stack: reentrancy)
        can_fold = not stack.bias and weight is not None and weight.dim() in (2, 4)
        if can_fold:
            rows, cols = weight.shape[0], weight.numel() // weight.shape[0]

        def pre(mod, args):
            """One prompt for the whole batch: run this call on W + ΔW(m) when that is cheaper than adding
            the low-rank term to the output (many tokens). W is swapped by reference, never written."""
            if self._shut or not can_fold or not self.fold or self._key[0] != "uniform" or not args:
                return None
            x, w = args[0], mod._parameters.get("weight")
            if (
                w is None
                or type(w) not in (torch.Tensor, torch.nn.Parameter)
                or w.dtype != x.dtype
                or w.device != x.device
                or not w.dtype.is_floating_point
            ):
                return None
            tokens = x.numel() // (x.shape[1] if four_d else x.shape[-1])
            if tokens * (cols + 2 * rows) <= 2 * rows * cols:  # reading W twice beats reading x and y
                return None
            swapped.append(w)
            mod._parameters["weight"] = stack.cast(x.device, x.dtype).folded_weight(w, self._key)
            return None

        def post(mod, args, output):
            if swapped and mod._parameters.get("weight") is not swapped[-1]:
                mod._parameters["weight"] = swapped.pop()  # restore the host's own tensor object
                return None
            if self._shut:
                return None
            rates = self._rates
            x = args[0]
            if self._key[0] != "uniform" and rates.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"membrane rates have {rates.shape[0]} rows but {stack.module} sees a batch of "
                    f"{x.shape[0]}; the host must set one row per batch row."
                )
            if not kxk:
                return membrane_forward(x, output, stack, rates, channels_first=four_d, key=self._key)
            key = (x.device, x.dtype)
            if key not in casts:
                casts[key] = [(i, w.to(device=x.device, dtype=x.dtype)) for i, w in conv_terms]
            m = rates.to(device=x.device, dtype=x.dtype)
            out = output
            for i, w in casts[key]:
                out = out + m[:, i, None, None, None] * F.conv2d(
                    x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups
                )
            for i, bias, rows_ in stack.bias:
                out = out + m[:, i, None, None, None] * bias.to(out)[None, :, None, None]
            return out

        return pre, post

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.rates = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
