"""Properties the UCE closed form must satisfy (closed_form.md (★), §3)."""

import math

import pytest
import torch

from erasers.config import ConfigError
from erasers.edits.closed_form import apply_ridge, shared_factors
from erasers.edits.eraser import compute_eraser
from erasers.edits.uce import UCEConfig, aligned_token_rows, erase_pairs, last_token_rows
from erasers.errors import EmptyConceptList, FamilyMismatch, NonFiniteResult, UnsupportedFamily
from erasers.files.families import Family, detect_family, layer_specs
from erasers_dev.testing import ToyTextEncoder, layer_shapes, layer_weights

torch.set_default_dtype(torch.float32)


def small_problem(d=16, out=12, n=3, m=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(out, d, generator=g, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(m, d, generator=g, dtype=torch.float64),
    )


def test_shared_factors_equal_the_direct_ridge_solution():
    w0, c, c_star, p = small_problem()
    lam, eta_e, eta_p = 0.5, 1.0, 0.3
    a, b = shared_factors(c, c_star, lam, eta_e, p, eta_p)
    keys = torch.cat([c, p])
    targets = torch.cat([c_star @ w0.T, p @ w0.T])
    weights = torch.cat(
        [torch.full((len(c),), eta_e, dtype=torch.float64), torch.full((len(p),), eta_p, dtype=torch.float64)]
    )
    direct = apply_ridge(w0, lam, keys, targets, weights)
    assert torch.allclose(w0 + w0 @ a @ b, direct, rtol=1e-10, atol=1e-10)


def test_closed_form_has_zero_gradient_of_its_objective():
    w0, c, c_star, p = small_problem(seed=1)
    lam = 0.5
    a, b = shared_factors(c, c_star, lam, 1.0, p, 1.0)
    w = (w0 + w0 @ a @ b).requires_grad_(True)
    loss = ((w @ c.T - w0 @ c_star.T) ** 2).sum() + ((w @ p.T - w0 @ p.T) ** 2).sum() + lam * ((w - w0) ** 2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-9


def test_erase_scale_zero_or_huge_lambda_gives_back_w0():
    w0, c, c_star, p = small_problem(seed=2)
    a, b = shared_factors(c, c_star, 0.5, 0.0, p, 1.0)
    assert torch.count_nonzero(w0 @ a @ b) == 0
    a, b = shared_factors(c, c_star, 1e12, 1.0, p, 1.0)
    assert (w0 @ a @ b).abs().max() < 1e-9


def test_one_concept_with_lambda_to_zero_maps_key_onto_target():
    w0, c, c_star, _ = small_problem(n=1, seed=3)
    a, b = shared_factors(c, c_star, 1e-9, 1.0, None, 1.0)
    w = w0 + w0 @ a @ b
    assert torch.allclose(w @ c[0], w0 @ c_star[0], rtol=1e-6, atol=1e-6)


def test_preserved_keys_move_less_than_unpreserved_ones():
    w0, c, c_star, p = small_problem(d=32, n=2, m=8, seed=4)
    a, b = shared_factors(c, c_star, 0.5, 1.0, p, 1.0)
    delta = w0 @ a @ b
    preserved_move = (delta @ p.T).norm() / (w0 @ p.T).norm()
    a0, b0 = shared_factors(c, c_star, 0.5, 1.0, None, 1.0)
    free_move = ((w0 @ a0 @ b0) @ p.T).norm() / (w0 @ p.T).norm()
    assert preserved_move < 0.2 * free_move
    assert preserved_move < 0.05


def test_uce_2025_uses_last_word_and_sot_for_empty_guide():
    enc = ToyTextEncoder(dim=16)
    cfg = UCEConfig(concepts=["red circle"], variant="2025")
    concepts, guides = erase_pairs(cfg)
    assert guides == [""]
    e_c, e_g = enc.encode(concepts), enc.encode(guides)
    assert int(e_c.last_subject_index[0]) == 2 and int(e_g.last_subject_index[0]) == 0
    assert torch.equal(last_token_rows(e_g)[0], e_g.hidden[0, 0])


def test_uce_2023_token_range_alignment_lengths():
    enc = ToyTextEncoder(dim=16, context_length=12)
    e_c = enc.encode(["vincent van gogh"])  # last word at 3
    e_g = enc.encode(["art"])  # last word at 1
    keys, targets = aligned_token_rows(e_c, e_g)
    assert keys.shape == targets.shape == (12 - 3, 16)
    assert torch.equal(keys[0], e_c.hidden[0, 3]) and torch.equal(targets[0], e_g.hidden[0, 1])
    assert torch.equal(keys[-1], e_c.hidden[0, 11]) and torch.equal(targets[-1], e_g.hidden[0, 9])


@pytest.mark.parametrize("variant", ["2023", "2025"])
def test_uce_on_full_size_sd15_shapes_edits_all_32_projections(variant):
    weights = layer_weights(Family.SD1)
    eraser = compute_eraser(
        UCEConfig(concepts=["Van Gogh"], concept_type="art", variant=variant), ToyTextEncoder(), weights
    )
    assert eraser.family == Family.SD1
    assert len(eraser.deltas) == 32
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in eraser.deltas)
    for key, delta in eraser.deltas.items():
        assert delta.shape == tuple(weights[key].shape)
        assert delta.is_finite()
    # the concept's key now maps to the guide's value (up to the regulariser's pull)
    enc = ToyTextEncoder()
    c = enc.encode(["Van Gogh"])
    g = enc.encode(["art"])
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    w0 = weights[key].double()
    w = w0 + eraser.dense(key).double()
    before = (w0 @ c.hidden[0, 2].double() - w0 @ g.hidden[0, 1].double()).norm()
    after = (w @ c.hidden[0, 2].double() - w0 @ g.hidden[0, 1].double()).norm()
    assert after < 0.5 * before


def test_uce_on_sdxl_shapes_edits_140_projections():
    weights = layer_weights(Family.SDXL)
    eraser = compute_eraser(UCEConfig(concepts=["cat"]), ToyTextEncoder(dim=2048, family="sdxl"), weights)
    assert eraser.family == Family.SDXL and len(eraser.deltas) == 140


def test_uce_on_flux_edits_text_and_pooled_projections_without_touching_bias():
    weights = layer_weights(Family.FLUX)
    enc = ToyTextEncoder(dim=4096, family="flux", pooled_dim=768, has_bos=False, context_length=32)
    eraser = compute_eraser(UCEConfig(concepts=["cat"]), enc, weights)
    assert set(eraser.deltas) == {"txt_in.weight", "vector_in.in_layer.weight"}
    assert eraser.deltas["txt_in.weight"].shape == (3072, 4096)
    assert eraser.deltas["vector_in.in_layer.weight"].shape == (3072, 768)


def test_wrong_width_text_encoder_is_refused():
    with pytest.raises(FamilyMismatch, match="768"):
        compute_eraser(UCEConfig(concepts=["cat"]), ToyTextEncoder(dim=1024, family="sd2"), layer_weights(Family.SD1))


def test_empty_concept_list_is_refused():
    with pytest.raises(EmptyConceptList):
        UCEConfig(concepts=["  ", ""])


def test_bad_config_values_are_refused():
    with pytest.raises(ConfigError, match="variant"):
        UCEConfig(concepts=["cat"], variant="1999")
    with pytest.raises(ConfigError, match="lam"):
        UCEConfig(concepts=["cat"], lam=-1)
    with pytest.raises(ConfigError, match="anchor"):
        UCEConfig(concepts=["cat", "dog", "cow"], anchors=["a", "b"])
    with pytest.raises(ConfigError, match="both erased and preserved"):
        UCEConfig(concepts=["cat"], preserve=["Cat"])


def test_config_round_trips_through_dict():
    cfg = UCEConfig(concepts=["cat"], anchors=["animal"], preserve=["dog"], lam=0.3, variant="2023")
    assert UCEConfig.from_dict(cfg.to_dict()) == cfg


def test_non_finite_result_is_reported():
    weights = layer_weights(Family.SD1)
    weights["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][0, 0] = math.nan
    with pytest.raises(NonFiniteResult, match="input_blocks.1.1"):
        compute_eraser(UCEConfig(concepts=["cat"]), ToyTextEncoder(), weights)


def test_detect_family_from_shapes():
    for fam in (Family.SD1, Family.SD2, Family.SDXL, Family.FLUX, Family.SD3):
        assert detect_family(layer_shapes(fam)) == fam
    assert detect_family(layer_shapes(Family.UNET, context_dim=64)) == Family.UNET
    with pytest.raises(UnsupportedFamily):
        detect_family({"foo.weight": (3, 3)})


def test_layer_specs_count_per_family():
    assert len(layer_specs(layer_shapes(Family.SD1), Family.SD1)) == 32
    assert len(layer_specs(layer_shapes(Family.SDXL), Family.SDXL)) == 140
    assert [s.kind for s in layer_specs(layer_shapes(Family.FLUX), Family.FLUX)] == ["text_in", "pooled_in"]


def test_hidream_by_stream_equals_one_solve_per_stream_and_each_stream_reads_its_own_encoder():
    """HiDream-I1's caption projections read different text streams: the merged eraser is, layer by layer,
    the eraser solved on that stream's Linears with that stream's encoder (full-size HiDream widths)."""
    from erasers.edits.eraser import compute_eraser_by_stream
    from erasers.families import hidream

    gen = torch.Generator().manual_seed(0)
    keys = [f"caption_projection.{i}.linear.weight" for i in range(5)]
    weights = {k: torch.randn(2560, 4096, generator=gen) * 0.02 for k in keys}
    weights[hidream.POOLED_KEY] = torch.randn(2560, 2048, generator=gen) * 0.02
    streams = hidream.caption_streams(list(weights), [0, 1, 3, 3])
    encoders = {
        "t5": ToyTextEncoder(dim=4096, family="t5", pooled_dim=2048, has_bos=False, context_length=16, seed=1),
        "llama.0": ToyTextEncoder(dim=4096, family="llama", context_length=16, seed=2),
        "llama.1": ToyTextEncoder(dim=4096, family="llama", context_length=16, seed=3),
        "llama.3": ToyTextEncoder(dim=4096, family="llama", context_length=16, seed=4),
    }
    config = UCEConfig(concepts=["cat"], preserve=["dog"])
    merged = compute_eraser_by_stream(config, encoders, weights, streams, Family.HIDREAM)
    assert sorted(merged.deltas) == sorted(weights) and merged.family is Family.HIDREAM
    for stream, names in hidream.group_by_stream(streams).items():
        alone = compute_eraser(config, encoders[stream], {k: weights[k] for k in names}, family=Family.HIDREAM)
        for key in names:
            assert torch.equal(merged.dense(key), alone.dense(key)), (stream, key)
    # the two projections of Llama layer 3 were solved with layer 3's keys, not layer 1's
    other = compute_eraser(config, encoders["llama.1"], {keys[2]: weights[keys[2]]}, family=Family.HIDREAM)
    assert not torch.allclose(merged.dense(keys[2]), other.dense(keys[2]))
    with pytest.raises(TypeError, match="No text encoder for the streams"):
        compute_eraser_by_stream(config, {"t5": encoders["t5"]}, weights, streams, Family.HIDREAM)
