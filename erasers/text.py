"""The one interface every host's text encoder is adapted to.

A closed-form edit, facilitated transport or SAFREE needs three things from a text encoder: the
per-token conditioning the denoiser sees, which positions are real tokens, and the token ids. Each host
adapter (ComfyUI CLIP, a diffusers pipeline, the shapes world, a single-file checkpoint) implements
``TextEncoder``; everything in ``erasers/`` talks only to this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from .errors import ConceptTooLong, EmptyConceptList


@dataclass
class PromptEncoding:
    """Encoded prompts, always float32 on CPU.

    hidden: (N, T, d) — exactly the context the denoiser's text projections receive (SDXL: the 2048-d
        concatenation; Flux/SD3: the T5 sequence the host builds).
    lengths: (N,) — number of real token positions including BOS/EOS (the attention-mask sum).
    token_ids: per prompt, the unpadded ids including BOS/EOS, as the host tokenizer produced them.
    pooled: (N, p) or None — the pooled vector where the family has one.
    has_bos: whether position 0 is a start token (CLIP: yes; T5: no).
    """

    hidden: torch.Tensor
    lengths: torch.Tensor
    token_ids: list
    pooled: Optional[torch.Tensor] = None
    has_bos: bool = True

    @property
    def last_subject_index(self) -> torch.Tensor:
        """Index of the last word token (UCE/SPEED "mask sum − 2"); 0 (the SOT) for the empty prompt."""
        return (self.lengths - 2).clamp(min=0)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @classmethod
    def from_rows(cls, rows: list, lengths: list, token_ids: list, before: list) -> "PromptEncoding":
        """Per-prompt (T_i, d) rows zero-padded to one batch, for encoders without a pooled vector;
        ``before`` = per prompt, the rows ahead of its first word (a start token or a kept template
        prefix), which play the role of CLIP's start token (``has_bos``)."""
        width = max(r.shape[0] for r in rows)
        hidden = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
        return cls(
            hidden=hidden,
            lengths=torch.tensor(lengths, dtype=torch.long),
            token_ids=token_ids,
            pooled=None,
            has_bos=min(before) > 0,
        )


def shared_head_tail(a: Sequence[int], b: Sequence[int]) -> tuple:
    """(head, tail): the lengths of the common prefix and of the common suffix of two token lists, the
    suffix not overlapping the prefix — a host template's tokens, found by tokenizing two texts."""
    limit = min(len(a), len(b))
    head = 0
    while head < limit and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < limit - head and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    return head, tail


@runtime_checkable
class TextEncoder(Protocol):
    """What the core needs from a host text encoder."""

    #: model family the encoder belongs to ("sd1", "sd2", "sdxl", "sd3", "flux", "shapes")
    family: str
    #: number of positions per prompt chunk (77 for CLIP)
    context_length: int

    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        """Encode a batch of prompts in one pass (padding to ``context_length``)."""
        ...


def check_prompts(prompts: Sequence[str], what: str = "concept") -> list:
    """Strip and validate a user list; empty entries are dropped, an empty list is an error."""
    cleaned = [p.strip() for p in prompts if p is not None and p.strip()]
    if not cleaned:
        raise EmptyConceptList(
            f"Expected at least one {what}, found none. Type one {what} per line (or separate them with "
            f"commas), e.g. 'Van Gogh'."
        )
    return cleaned


def check_fits(encoding: PromptEncoding, prompts: Sequence[str], context_length: int) -> None:
    """Refuse prompts that the tokenizer had to truncate: a cut concept erases the wrong thing."""
    for prompt, ids in zip(prompts, encoding.token_ids):
        if len(ids) > context_length:
            raise ConceptTooLong(
                f"The concept '{prompt[:60]}' has {len(ids)} tokens with start/end markers, but the text "
                f"encoder's context holds {context_length}. Shorten it or split it into several concepts."
            )


def split_concepts(text: str) -> list:
    """User text box → list: one concept per line; commas separate too unless the line is quoted."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) >= 2 and line[0] == line[-1] == '"':
            out.append(line[1:-1].strip())
        else:
            out.extend(part.strip() for part in line.split(",") if part.strip())
    return out


def encode_batched(
    encoder: TextEncoder, prompts: Sequence[str], chunk: int = 64, progress=None, real_tokens_only: bool = False
) -> PromptEncoding:
    """Encode many prompts in batches of ``chunk`` (one forward pass each, never one by one).

    ``progress(done, total)`` is called after each batch so hosts can drive a progress bar.
    ``real_tokens_only``: the caller reads only rows up to each prompt's EOS (e.g. the last word). An
    encoder that offers ``encode_real_tokens`` then skips the padding positions — exact for causal
    encoders like CLIP, where a row never sees the positions after it, and ~10× less work for short
    prompts. Rows past a prompt's own length are then zero-filled and must not be read.
    """
    prompts = list(prompts)
    encode = encoder.encode
    if real_tokens_only and callable(getattr(encoder, "encode_real_tokens", None)):
        encode = encoder.encode_real_tokens
    parts = []
    for start in range(0, len(prompts), chunk):
        parts.append(encode(prompts[start : start + chunk]))
        if progress is not None:
            progress(min(start + chunk, len(prompts)), len(prompts))
    if not parts:
        raise EmptyConceptList("Nothing to encode.")
    width = max(p.hidden.shape[1] for p in parts)
    for p in parts:  # chunks trimmed to their own longest prompt: pad to a common length
        if p.hidden.shape[1] < width:
            p.hidden = torch.nn.functional.pad(p.hidden, (0, 0, 0, width - p.hidden.shape[1]))
    pooled = None
    if all(p.pooled is not None for p in parts):
        pooled = torch.cat([p.pooled.float() for p in parts])
    encoding = PromptEncoding(
        hidden=torch.cat([p.hidden.float() for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        token_ids=[ids for p in parts for ids in p.token_ids],
        pooled=pooled,
        has_bos=parts[0].has_bos,
    )
    check_fits(encoding, prompts, encoder.context_length)
    return encoding
