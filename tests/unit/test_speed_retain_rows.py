"""SPEED reads retain prompts at the rows it edits: last words, or in the all-rows (nudity) alignment
every row after the SOT — as the reference reads its default retain prompt ''."""

import torch

from erasers.edits.speed import retain_rows
from erasers.text import PromptEncoding


def _enc(n, t=6, d=4, seed=0):
    hidden = torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))
    return PromptEncoding(hidden=hidden, lengths=torch.full((n,), 3), token_ids=[[0, 5, 1]] * n)


def test_last_word_rows_by_default():
    enc_r, enc_null = _enc(2), _enc(1, seed=1)
    rows = retain_rows(enc_r, enc_null, pooled=False)
    assert torch.equal(rows, enc_r.hidden[:, 1].double())  # lengths 3 → last word at index 1


def test_all_rows_alignment_reads_every_row_after_the_sot():
    enc_r, enc_null = _enc(2), _enc(1, seed=1)
    rows = retain_rows(enc_r, enc_null, pooled=False, all_rows=True)
    assert torch.equal(rows, enc_r.hidden[:, 1:].reshape(-1, 4).double())
    # without a list, the reference's retain [''] — unchanged
    assert torch.equal(retain_rows(None, enc_null, pooled=False), enc_null.hidden[0, 1:].double())
    assert torch.equal(retain_rows(None, enc_null, pooled=False, all_rows=True), enc_null.hidden[0, 1:].double())
