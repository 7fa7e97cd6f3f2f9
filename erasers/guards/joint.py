"""Where a family's text tokens sit, in its tokenizer and in its attention; token suppression there.

Host-free (torch only). The host adapter reads the token ids and the tensors; this module does the
bookkeeping and the math:

* **Words of a prompt in the host's tokenization.** The newer families wrap the prompt in a chat
  template (Qwen-Image, Flux.2, Z-Image) or pad it (Flux.2-klein and Wan to 512), and some encoders drop
  part of the template (Qwen-Image keeps what follows ``<|im_start|>user\\n``). The user's words are what
  the prompt's tokenization has and the empty prompt's does not: the common prefix (template head) and
  the common suffix (template tail, end token, padding) are the host's, the rest is the text
  (``word_span``). The context rows are the tokens minus a dropped head (``dropped_head``).
* **Joint attention, text first** (Chroma, Flux.2, Qwen-Image, Lumina 2 / Z-Image): q, k, v span
  [text ‖ image]; the image queries get log c on the concept's text-key columns, the text queries and
  every other column are untouched (``joint_suppressed_attention``). Lumina 2 / Z-Image pad the text
  block at its end (``cap_pad_token``), SD3 puts register tokens before it: ``text_start`` says where the
  context's first row sits.
* **Cross-attention to the text** (Wan, like a UNet's attn2): the keys are the text, every query — every
  frame's tokens of a video — gets the bias (``token_suppress.suppressed_attention``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..text import shared_head_tail


def _strip_run(ids: list, token: int) -> list:
    """``ids`` without its trailing run of ``token`` (padding)."""
    end = len(ids)
    while end > 0 and ids[end - 1] == token:
        end -= 1
    return ids[:end]


def word_span(ids: Sequence[int], empty_ids: Sequence[int]) -> tuple:
    """(start, end): the positions of a text's own tokens in ``ids`` (its host tokenization), given the host
    tokenization of the empty text ``empty_ids`` (template and padding only).

    Padding (a trailing run of two or more of the empty tokenization's last id) is taken off both; then the
    common prefix
    is the template head and the common suffix its tail. An empty span (start == end) means the text added
    no token of its own."""
    ids, empty = list(ids), list(empty_ids)
    if empty and ids and ids[-1] == empty[-1]:
        pad = empty[-1]
        stripped, empty_stripped = _strip_run(ids, pad), _strip_run(empty, pad)
        # a run of two or more is padding; a single shared last token is the template's end and stays
        if len(ids) - len(stripped) > 1 or len(empty) - len(empty_stripped) > 1:
            ids, empty = stripped, empty_stripped
    head, tail = shared_head_tail(ids, empty)
    return head, len(ids) - tail


def word_ids(ids: Sequence[int], empty_ids: Sequence[int]) -> list:
    """The text's own token ids (``word_span`` of ``ids``)."""
    start, end = word_span(ids, empty_ids)
    return list(ids)[start:end]


def dropped_head(n_tokens: int, n_rows: int) -> int:
    """How many leading token positions the host's encoder dropped: its output has ``n_rows`` rows for
    ``n_tokens`` tokens (Qwen-Image drops the template head; the others keep every token)."""
    return max(0, n_tokens - n_rows)


def joint_column_bias(bias: torch.Tensor, length: int, text_start: int = 0) -> torch.Tensor:
    """(B, L) float32 bias over the joint keys: the context's (B, T) column bias at [text_start,
    text_start + T), zero on every other column (image keys, registers, text padding)."""
    if text_start < 0 or text_start + bias.shape[1] > length:
        raise ValueError(
            f"the text block [{text_start}, {text_start + bias.shape[1]}) does not fit a joint sequence of "
            f"{length} positions"
        )
    columns = torch.zeros(bias.shape[0], length, dtype=torch.float32, device=bias.device)
    columns[:, text_start : text_start + bias.shape[1]] = bias.float()
    return columns


def additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A host attention mask as an additive (B|1, H|1, Lq|1, Lk) tensor (bool: True = attend)."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    return mask.to(dtype)


def _query_rows(mask: Optional[torch.Tensor], start: int, length: int, total: int) -> Optional[torch.Tensor]:
    if mask is None or mask.shape[2] != total or total == 1:
        return mask
    return mask.narrow(2, start, length)


def joint_suppressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    column_bias: torch.Tensor,
    image_start: int,
    attention_fn: Callable,
    seq_dim: int,
    out_seq_dim: int,
    mask: Optional[torch.Tensor] = None,
    image_end: Optional[int] = None,
) -> torch.Tensor:
    """Joint attention in which only the image queries [image_start, image_end) (default: to the end) see
    ``column_bias`` (B, L) on the keys; the text queries before and after them attend as the model does
    (text first: Flux, SD3, Qwen-Image; image first: HiDream). Query rows are independent, so the calls of
    ``attention_fn(q, k, v, heads, mask=…)`` give exactly the unsplit attention elsewhere.

    ``seq_dim`` is q's sequence axis (2 for head-split (B, H, L, D), 1 for (B, L, H·D)); ``out_seq_dim``
    the output's. ``mask`` is the model's own mask (additive or bool), kept on every part."""
    total = q.shape[seq_dim]
    image_end = total if image_end is None else image_end
    if not 0 <= image_start < image_end <= total:
        raise ValueError(f"the image queries [{image_start}, {image_end}) do not fit a sequence of {total}")
    host = additive_mask(mask, q.dtype) if mask is not None else None
    bias = column_bias.to(q.device, q.dtype)[:, None, None, :]
    image_len = image_end - image_start
    img_mask = bias if host is None else _query_rows(host, image_start, image_len, total) + bias
    parts = []
    if image_start > 0:
        parts.append(
            attention_fn(q.narrow(seq_dim, 0, image_start), k, v, heads, mask=_query_rows(host, 0, image_start, total))
        )
    parts.append(attention_fn(q.narrow(seq_dim, image_start, image_len), k, v, heads, mask=img_mask))
    if image_end < total:
        tail = total - image_end
        tail_mask = _query_rows(host, image_end, tail, total)
        parts.append(attention_fn(q.narrow(seq_dim, image_end, tail), k, v, heads, mask=tail_mask))
    return torch.cat(parts, dim=out_seq_dim) if len(parts) > 1 else parts[0]
