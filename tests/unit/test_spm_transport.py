"""Facilitated transport on hand-made embeddings: known cosines and token overlaps give the exact m."""

import math

import pytest
import torch

from erasers.errors import EmptyConceptList, EraserError
from erasers.membranes.spm import GATE_FT, Gate, Membrane, RateCache
from erasers.membranes.transport import concept_scores, permeability, special_token_ids, token_overlap
from erasers.text import PromptEncoding
from erasers_dev.testing import ToyTextEncoder

BOS, EOS = 1, 2
T, D = 4, 3


def unit(i):
    v = torch.zeros(T * D)
    v[i] = 1.0
    return v


def enc(vectors, ids):
    hidden = torch.stack([v.reshape(T, D) for v in vectors])
    return PromptEncoding(hidden=hidden, lengths=torch.tensor([len(r) for r in ids]), token_ids=ids)


def at_angle(cos):
    return cos * unit(0) + math.sqrt(1 - cos * cos) * unit(1)


def test_score_is_max_of_cosine_and_overlap():
    concept = enc([unit(0)], [[BOS, 10, 11, EOS]])
    prompts = enc(
        [at_angle(0.3), at_angle(0.8), at_angle(0.3)], [[BOS, 10, 20, EOS], [BOS, 10, 20, EOS], [BOS, 30, EOS]]
    )
    m = permeability(prompts, concept)[:, 0]
    torch.testing.assert_close(m, torch.tensor([0.5, 0.8, 0.3], dtype=torch.float64))


def test_overlap_uses_sets_and_ignores_bos_eos():
    assert token_overlap([BOS, 10, 10, EOS], [BOS, 10, 11, 11, EOS], {BOS, EOS}) == 0.5
    assert token_overlap([BOS, EOS], [BOS, EOS], {BOS, EOS}) == 0.0  # empty concept: 0, never a division by zero
    assert token_overlap([BOS, 11, 10, EOS, EOS], [BOS, 10, 11, EOS], {BOS, EOS}) == 1.0


def test_special_ids_come_from_bos_and_eos_of_each_sequence():
    e = enc([unit(0)], [[BOS, 10, EOS]])
    assert special_token_ids(e) == {BOS, EOS}
    e.has_bos = False
    assert special_token_ids(e) == {EOS}


def test_cosine_is_over_the_whole_flattened_sequence():
    # same direction in a different scale: cos 1; padding rows count (they are part of E)
    concept = enc([unit(0) + unit(11)], [[BOS, 10, EOS]])
    prompt = enc([3 * (unit(0) + unit(11))], [[BOS, 99, EOS]])
    assert concept_scores(prompt, concept)[0, 0].item() == pytest.approx(1.0)
    prompt2 = enc([unit(0)], [[BOS, 99, EOS]])
    assert concept_scores(prompt2, concept)[0, 0].item() == pytest.approx(1 / math.sqrt(2))


def test_max_over_concepts_and_groups_per_membrane():
    concepts = enc([unit(0), unit(2), unit(5)], [[BOS, 10, EOS], [BOS, 11, EOS], [BOS, 12, EOS]])
    prompt = enc([0.6 * unit(0) + 0.8 * unit(2)], [[BOS, 12, EOS]])
    m = permeability(prompt, concepts, groups=[2, 1])
    torch.testing.assert_close(m, torch.tensor([[0.8, 1.0]], dtype=torch.float64))
    assert permeability(prompt, concepts, metric="clipcos")[0, 0].item() == pytest.approx(0.8)
    assert permeability(prompt, concepts, metric="tokenuni")[0, 0].item() == 1.0


def test_gate_validates():
    with pytest.raises(EmptyConceptList):
        Gate(GATE_FT, [])
    with pytest.raises(EraserError):
        Gate("sometimes", ["x"])


class CountingEncoder(ToyTextEncoder):
    calls = 0

    def encode(self, prompts):
        CountingEncoder.calls += len(prompts)
        return super().encode(prompts)


def test_rate_cache_matches_the_formula_and_caches_per_prompt():
    encoder = CountingEncoder(dim=16, context_length=8)
    mem = Membrane({}, Gate(GATE_FT, ["snoopy dog", "cartoon"]), strength=0.7)
    fixed = Membrane({}, Gate(), strength=0.4)
    cache = RateCache([mem, fixed], encoder)
    rates = cache.rates(["a photo of snoopy", "a red car", "a photo of snoopy"])
    e_c = encoder.encode(["snoopy dog", "cartoon"])
    e_p = encoder.encode(["a photo of snoopy", "a red car"])
    expected = 0.7 * permeability(e_p, e_c)[:, 0]
    torch.testing.assert_close(rates[:2, 0], expected.float())
    assert rates[0, 0] == rates[2, 0]
    assert torch.all(rates[:, 1] == 0.4)
    calls = CountingEncoder.calls
    cache.rates(["a red car", "a photo of snoopy"])
    assert CountingEncoder.calls == calls  # cached: no new encode
