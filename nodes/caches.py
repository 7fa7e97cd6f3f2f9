"""Small bounded caches keyed by exact content, shared by the ComfyUI glue.

A long ComfyUI session queues thousands of prompts; a cache that only grows is a leak, and one keyed by
``id(tensor)`` (reused after garbage collection) or a rounded sum (two prompts can share it) can hand one
prompt's gate decision to another — for a safety tool, a silent miss. Keys here are digests of the
exact bytes, and each cache keeps its most recent ``size`` entries.
"""

import hashlib
from collections import OrderedDict

import torch


def tensor_key(tensor: torch.Tensor) -> tuple:
    """(shape, dtype, SHA-1 of the bytes): equal only for bit-identical tensors."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return tuple(data.shape), str(data.dtype), digest


class BoundedCache(OrderedDict):
    """An LRU mapping of at most ``size`` entries (oldest dropped first)."""

    def __init__(self, size: int = 128):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
