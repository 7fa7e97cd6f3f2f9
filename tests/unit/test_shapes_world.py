"""The shapes world generator and tokenizer: determinism, label/caption consistency, rendering."""

import itertools

import pytest
import torch

from erasers_dev.shapes import world
from erasers_dev.shapes.tokenizer import ShapesTokenizer


def test_sample_batch_is_deterministic_given_the_generator():
    a = world.sample_batch(32, torch.Generator().manual_seed(7), 16)
    b = world.sample_batch(32, torch.Generator().manual_seed(7), 16)
    c = world.sample_batch(32, torch.Generator().manual_seed(8), 16)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


def test_batch_shapes_and_range():
    images, captions, labels = world.sample_batch(16, torch.Generator().manual_seed(0), 16)
    assert images.shape == (16, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert len(captions) == 16
    for key, names in (
        ("shape", world.SHAPES),
        ("colour", world.COLOURS),
        ("style", world.STYLES),
        ("background", world.BACKGROUNDS),
    ):
        assert labels[key].shape == (16,) and labels[key].max() < len(names)


def _words(caption):
    return set(caption.replace(",", " ").split())


def test_captions_name_the_labels():
    _, captions, labels = world.sample_batch(300, torch.Generator().manual_seed(1), 16)
    for i, caption in enumerate(captions):
        words = _words(caption)
        shape = world.SHAPES[int(labels["shape"][i])]
        colour = world.COLOURS[int(labels["colour"][i])]
        assert words & set(world.SYNONYMS[shape]), caption
        assert words & set(world.SYNONYMS[colour]), caption
        # no other shape or colour is mentioned
        for other in world.SHAPES + world.COLOURS:
            if other not in (shape, colour):
                assert not words & set(world.SYNONYMS[other]), caption
        style = world.STYLES[int(labels["style"][i])]
        for other in world.STYLES:
            if other != style:
                assert not words & set(world.SYNONYMS[other]), caption


def test_training_captions_avoid_heldout_pairs_and_templates():
    _, captions, _ = world.sample_batch(2000, torch.Generator().manual_seed(2), 16)
    for syn, colour in world.HELDOUT_SYNONYM_COLOURS:
        colour_words = set(world.SYNONYMS[colour])
        assert not any(syn in _words(c) and _words(c) & colour_words for c in captions), syn


def test_heldout_templates_use_only_trained_words():
    trained = set()
    for template in world.TEMPLATES:
        trained |= {w for w in template.replace(",", " ").split() if not w.startswith("{")}
    for template in world.HELDOUT_TEMPLATES:
        words = {w for w in template.replace(",", " ").split() if not w.startswith("{")}
        assert words <= trained, (template, words - trained)
    assert not set(world.HELDOUT_TEMPLATES) & set(world.TEMPLATES)


def test_every_shape_and_colour_renders_distinct_pixels():
    shapes = {s: world.render(s, "red", "plain", "white") for s in world.SHAPES}
    for a, b in itertools.combinations(world.SHAPES, 2):
        assert (shapes[a] - shapes[b]).abs().sum() > 5, (a, b)
    colours = {c: world.render("circle", c, "plain", "black") for c in world.COLOURS}
    for a, b in itertools.combinations(world.COLOURS, 2):
        assert (colours[a] - colours[b]).abs().sum() > 5, (a, b)
    styles = {s: world.render("square", "blue", s, "white") for s in world.STYLES}
    for a, b in itertools.combinations(world.STYLES, 2):
        assert (styles[a] - styles[b]).abs().sum() > 5, (a, b)


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown shape 'hexagon'"):
        world.render("hexagon", "red")


def test_tokenizer_bos_eos_pad_and_lengths():
    tok = ShapesTokenizer.default(context_length=16)
    ids, lengths = tok.encode(["A Red, circle!", ""])
    assert ids.shape == (2, 16)
    assert lengths.tolist() == [6, 2]  # BOS a red , circle EOS / BOS EOS
    assert ids[0, 0] == tok.bos_id and ids[0, 5] == tok.eos_id and (ids[0, 6:] == tok.pad_id).all()
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id] and (ids[1, 2:] == tok.pad_id).all()
    assert tok.decode(ids[0]) == "a red , circle"


def test_tokenizer_unknown_words_and_truncation():
    tok = ShapesTokenizer.default(context_length=6)
    assert tok.ids("a zebra") == [tok.bos_id, tok.vocab["a"], tok.unk_id, tok.eos_id]
    ids, lengths = tok.encode(["a red circle on a white background"])
    assert lengths.tolist() == [6] and ids[0, -1] == tok.eos_id
    assert len(tok.ids("a red circle on a white background")) == 9  # untruncated, for check_fits
    with pytest.raises(TypeError):
        tok.encode("a red circle")


def test_every_caption_word_is_in_the_vocabulary():
    tok = ShapesTokenizer.default()
    _, captions, _ = world.sample_batch(500, torch.Generator().manual_seed(3), 16)
    for caption in captions:
        assert tok.unk_id not in tok.ids(caption), caption
        assert len(tok.ids(caption)) <= tok.context_length, caption
