"""SPEED: exact null space, invariants, the constrained optimum (§9.3), presets, layer selection."""

import math

import pytest
import torch

from erasers.config import ConfigError
from erasers.edits import speed
from erasers.edits.eraser import compute_eraser
from erasers.files.families import Family
from erasers_dev.testing import ToyTextEncoder, layer_weights


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthonormal(d, k, seed=0):
    return torch.linalg.qr(rand(d, k, seed=seed))[0]


def literal_delta(w, c1, c_star, n, q, k2, alpha, lamb):
    """§5.2 step 8 written literally with dense matrices and explicit inverses (a reference only)."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    p = eye - q @ q.T
    sigma_tt, sigma_at = c1.T @ c1 / n, c_star.T @ c1 / n
    m = torch.linalg.inv(sigma_tt @ p + alpha * eye)
    s = k2.T @ p @ m @ k2 + lamb * torch.eye(k2.shape[1], dtype=torch.float64)
    return w @ (sigma_at - sigma_tt) @ p @ (eye - m @ k2 @ torch.linalg.inv(s) @ k2.T @ p) @ m


def brute_force_delta(w, c1, c_star, n, q, k2, alpha):
    """argmin (1/n)‖Δ C1ᵀ − W(C* − C1)ᵀ‖² + α‖Δ‖² over Δ = XP with ΔK2 = 0: rows of Δ in (span Q + span K2)^⊥."""
    basis = torch.linalg.svd(torch.cat([q, k2], dim=1), full_matrices=True)[0]
    rank = torch.linalg.matrix_rank(torch.cat([q, k2], dim=1))
    nn = basis[:, rank:]  # orthonormal basis of the allowed row space
    r = w @ (c_star - c1).T
    a = nn.T @ c1.T  # Δ C1ᵀ = Z NᵀC1ᵀ
    z = torch.linalg.solve(a @ a.T / n + alpha * torch.eye(nn.shape[1], dtype=torch.float64), (r @ a.T / n).T).T
    return z @ nn.T


@pytest.mark.parametrize("rows", [2, 11])  # fewer rows than d (Woodbury solves) and more (d×d solves)
def test_matches_brute_force_constrained_optimum(rows):
    d, out = 8, 5
    w, c1, c_star = rand(out, d, seed=1), rand(rows, d, seed=2), rand(rows, d, seed=3)
    q, k2 = orthonormal(d, 2, seed=4), rand(d, 2, seed=5)
    n = 3
    y = speed.speed_down(c1, n, q, k2, alpha=0.3, lamb=0.0)
    got = w @ (c_star - c1).T @ y
    want = brute_force_delta(w, c1, c_star, n, q, k2, alpha=0.3)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
    # and the literal published formula (λ = 0 and λ > 0)
    for lamb in (0.0, 0.5):
        got = w @ (c_star - c1).T @ speed.speed_down(c1, n, q, k2, alpha=0.3, lamb=lamb)
        lit = literal_delta(w, c1, c_star, n, q, k2, 0.3, lamb)
        assert float((got - lit).abs().max() / lit.abs().max()) < 1e-9, lamb


def small_setup(d=16):
    encoder = ToyTextEncoder(dim=d, context_length=8, vocab=256)
    enc_c = encoder.encode(["snoopy", "mickey mouse"])
    enc_a = encoder.encode(["", ""])
    enc_null = encoder.encode([""])
    return encoder, enc_c, enc_a, enc_null


def test_retained_null_space_is_untouched():
    d = 16
    _, enc_c, enc_a, enc_null = small_setup(d)
    cfg = speed.SPEEDConfig(concepts=["snoopy", "mickey mouse"], prior_filter=False, aug_num=0, threshold=1e-3)
    c1, c_star, n = speed.concept_rows(cfg, enc_c, enc_a, False)
    retain = 3.0 * orthonormal(d, 5, seed=7).T  # an exact 5-dim retain span, eigenvalues 9/5 ≫ τ
    k2 = speed.invariants(enc_null, False, 3, 0)
    w = rand(40, d, seed=8) / 4
    delta, q = speed.layer_delta(w, c1, c_star, n, retain, k2, cfg, torch.Generator().manual_seed(0))
    dense = delta.dense(torch.float64)
    assert q.shape[1] == 5
    keys = torch.cat([retain, rand(6, 5, seed=9) @ retain])  # the rows and combinations of them
    rel = (keys @ dense.T).norm(dim=1) / (keys @ w.T).norm(dim=1)
    assert float(rel.max()) < 1e-5
    assert float(dense.norm()) > 1e-3 * float(w.norm())  # and it did edit something


def test_filtered_and_augmented_retained_directions_are_untouched():
    d = 16
    _, enc_c, enc_a, enc_null = small_setup(d)
    cfg = speed.SPEEDConfig(concepts=["snoopy", "mickey mouse"], threshold=1e-6)
    c1, c_star, n = speed.concept_rows(cfg, enc_c, enc_a, False)
    retain = rand(6, d, seed=3)
    k2 = speed.invariants(enc_null, False, 3, 0)
    w = rand(40, d, seed=8) / 4
    delta, q = speed.layer_delta(w, c1, c_star, n, retain, k2, cfg, torch.Generator().manual_seed(0))
    assert 0 < q.shape[1] < d
    rel = (delta.dense(torch.float64) @ q).norm() / (w @ q).norm()
    assert float(rel) < 1e-5


def test_invariants_unchanged_with_lambda_zero():
    d = 16
    _, enc_c, enc_a, enc_null = small_setup(d)
    cfg = speed.SPEEDConfig(concepts=["snoopy", "mickey mouse"], lamb=0.0, preserve=["garfield"])
    c1, c_star, n = speed.concept_rows(cfg, enc_c, enc_a, False)
    k2 = speed.invariants(enc_null, False, 3, 0)
    assert k2.shape == (d, 4)
    torch.testing.assert_close(k2[:, 0], enc_null.hidden[0, 0].double())  # the SOT row
    retain = rand(3, d, seed=11)
    w = rand(40, d, seed=8) / 4
    delta, _ = speed.layer_delta(w, c1, c_star, n, retain, k2, cfg, torch.Generator().manual_seed(0))
    dense = delta.dense(torch.float64)
    assert float((dense @ k2).norm() / ((w @ k2).norm())) < 1e-10
    # with λ > 0 the invariants are only approximately kept: the constraint really is what pins them
    cfg_l = speed.SPEEDConfig(concepts=["snoopy", "mickey mouse"], lamb=50.0)
    delta_l, _ = speed.layer_delta(w, c1, c_star, n, retain, k2, cfg_l, torch.Generator().manual_seed(0))
    assert float((delta_l.dense(torch.float64) @ k2).norm() / ((w @ k2).norm())) > 1e-6


def test_least_sensitive_direction_matches_svd():
    for out, d, seed in ((200, 96, 0), (64, 96, 3), (640, 768, 1), (1280, 768, 2)):  # eigh and iteration paths
        w = rand(out, d, seed=seed) / math.sqrt(d)
        v = speed.least_sensitive_direction(w, seed=0)
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        assert abs(float(v.norm()) - 1) < 1e-12
        # as insensitive as the smallest singular direction (nearly degenerate ones are equally good) …
        assert float((w @ v).norm()) < float(s[-1]) * (1 + 1e-3), (out, d)
        # … and inside the row space (out < d: no component in W's null space)
        assert float((v - vh.T @ (vh @ v)).norm()) < 1e-8


def test_kmeans_is_deterministic_and_finds_clusters():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    points = torch.cat([c + 0.1 * rand(20, 2, seed=i) for i, c in enumerate(centres)])
    found = speed.kmeans(points, 3, seed=0)
    assert torch.equal(found, speed.kmeans(points, 3, seed=0))
    dist = torch.cdist(centres, found).min(dim=1).values
    assert float(dist.max()) < 0.2


def test_retained_basis_span_route_equals_full_eigh():
    d = 12
    rows = rand(5, d, seed=1)
    samples = torch.cat([rows, rows[:3] + 0.5 * rand(3, 1, seed=2) * rand(1, d, seed=3)])
    span = torch.cat([rows, rand(1, d, seed=3)])
    q_small = speed.retained_basis(samples, span, 0.05)
    q_full = speed.retained_basis(samples, rand(d, d, seed=4), 0.05)  # span ≥ d → full eigh
    torch.testing.assert_close(q_small @ q_small.T, q_full @ q_full.T, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "bad",
    [
        dict(params="Q"),
        dict(aug_num=-1),
        dict(threshold=-0.1),
        dict(retain_scale=0.0),
        dict(lamb=-1.0),
        dict(n_centroids=1.5),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        speed.SPEEDConfig(concepts=["x"], **bad)


def test_presets_match_the_table():
    p = speed.SPEEDConfig.PRESETS
    row = lambda name: tuple(
        p[name][k] for k in ("params", "aug_num", "threshold", "retain_scale", "lamb", "prior_filter", "anchors")
    )
    assert row("few") == ("V", 10, 0.1, 1.0, 0.0, True, [""])
    assert row("styles") == ("V", 10, 0.1, 1.0, 0.0, True, ["art"])
    assert row("multi") == ("V", 10, 1e-4, 0.05, 0.0, False, ["person"])
    assert row("nudity") == ("V", 10, 0.1, 0.7, 0.5, True, [""])
    nud = speed.SPEEDConfig(concepts=["nudity"], concept_type="nudity")
    assert (nud.effective_alpha(), nud.effective_lamb()) == (0.7, 0.5)
    dflt = speed.SPEEDConfig(concepts=["x"])
    assert (dflt.params, dflt.aug_num, dflt.threshold, dflt.effective_alpha(), dflt.effective_lamb()) == (
        "V",
        10,
        0.1,
        1.0,
        0.0,
    )
    cfg = speed.SPEEDConfig.from_preset("multi", concepts=["a", "b"])
    assert speed.SPEEDConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "params,count,suffixes",
    [("V", 16, ("to_v.weight",)), ("K", 16, ("to_k.weight",)), ("KV", 32, ("to_k.weight", "to_v.weight"))],
)
def test_sd15_shapes_edit_the_selected_projections(params, count, suffixes):
    cfg = speed.SPEEDConfig(concepts=["Snoopy", "Mickey Mouse"], params=params, preserve=["Garfield"])
    eraser = compute_eraser(cfg, ToyTextEncoder(), layer_weights(Family.SD1))
    assert len(eraser.deltas) == count
    assert all(k.endswith(suffixes) for k in eraser.deltas)
    assert all(d.is_finite() and d.rank <= 2 for d in eraser.deltas.values())


def test_sd15_nudity_preset_runs():
    cfg = speed.SPEEDConfig.from_preset("nudity", concepts=["nudity"])
    eraser = compute_eraser(cfg, ToyTextEncoder(), layer_weights(Family.SD1))
    assert len(eraser.deltas) == 16 and all(d.is_finite() for d in eraser.deltas.values())


@pytest.mark.slow  # 4096-wide closed forms on a 2-core CPU: ~20–40 s
def test_flux_shapes_end_to_end():
    encoder = ToyTextEncoder(dim=4096, pooled_dim=768, has_bos=False, family="flux", context_length=16)
    eraser = compute_eraser(speed.SPEEDConfig(concepts=["a cat"]), encoder, layer_weights(Family.FLUX))
    assert set(eraser.deltas) == {"txt_in.weight", "vector_in.in_layer.weight"}
    assert all(d.is_finite() for d in eraser.deltas.values())


def test_ipf_keeps_the_most_affected_rows_and_dpa_moves_only_along_v_min():
    d = 12
    w, retain = rand(20, d, seed=1), rand(9, d, seed=2)
    f = rand(d, d, seed=3)
    erase_map = lambda x: f @ x  # Δ_erase = W F
    v = speed.least_sensitive_direction(w)
    influence = (w @ f @ retain.T).norm(dim=0)
    samples, span = speed.refine_retain(w, erase_map, retain, v, 10, True, torch.Generator().manual_seed(0))
    kept = retain[influence >= influence.mean()]
    assert 0 < len(kept) < len(retain) and torch.equal(samples[: len(kept)], kept)
    aug = samples[len(kept) :]
    assert 0 < len(aug) <= 10 * len(kept)
    # each augmented row is a kept row plus a multiple of v_min
    resid = aug[:, None, :] - kept[None]
    off_axis = (resid - (resid @ v)[..., None] * v).norm(dim=-1).min(dim=1).values
    assert float(off_axis.max()) < 1e-10
    # a single retain row survives the filter
    one, _ = speed.refine_retain(w, erase_map, retain[:1], v, 0, True, torch.Generator().manual_seed(0))
    assert one.shape[0] == 1


def test_batched_least_sensitive_direction_equals_one_by_one():
    for out, d in ((100, 64), (320, 768)):
        ws = torch.stack([rand(out, d, seed=s) for s in range(3)])
        batch = speed.least_sensitive_direction(ws)
        for w, v in zip(ws, batch):
            assert abs(float(v @ speed.least_sensitive_direction(w))) > 1 - 1e-9


@pytest.mark.parametrize("prior_filter,aug_num,lamb", [(True, 10, 0.0), (False, 0, 0.5), (True, 3, 0.5)])
def test_batched_layers_equal_the_per_layer_path(prior_filter, aug_num, lamb):
    """erase() runs layer_deltas (batched over equal shapes, Y over all layers); layer_delta is the reference."""
    d = 320  # > EIGH_MAX: both the eigh route (out ≤ 256) and the inverse-iteration route (300×320, 400×320)
    encoder = ToyTextEncoder(dim=d, context_length=8, vocab=256)
    concepts = ["snoopy", "mickey mouse", "pikachu"]
    cfg = speed.SPEEDConfig(concepts=concepts, prior_filter=prior_filter, aug_num=aug_num, lamb=lamb, threshold=1e-3)
    c1, c_star, n = speed.concept_rows(cfg, encoder.encode(concepts), encoder.encode([""] * 3), False)
    k2 = speed.invariants(encoder.encode([""]), False, 3, 0)
    retain = rand(12, d, seed=7)
    ws = [rand(out, d, seed=10 + i) / math.sqrt(d) for i, out in enumerate((300, 40, 400, 300, 40))]
    batched = speed.layer_deltas(
        [w.float() for w in ws], c1, c_star, n, retain, k2, cfg, torch.Generator().manual_seed(0)
    )
    gen = torch.Generator().manual_seed(0)  # one generator through the layers, in order
    for w, (delta_b, q_b) in zip(ws, batched):
        delta_1, q_1 = speed.layer_delta(w.float(), c1, c_star, n, retain, k2, cfg, gen)
        torch.testing.assert_close(q_b @ q_b.T, q_1 @ q_1.T, rtol=0, atol=1e-9)
        dense_b, dense_1 = delta_b.dense(torch.float64), delta_1.dense(torch.float64)
        assert float((dense_b - dense_1).norm() / dense_1.norm()) < 1e-6  # U is formed in float32
        # and the batched result keeps SPEED's guarantee: the retained span is untouched
        assert float((dense_b @ q_b).norm() / (w @ q_b).norm()) < 1e-5
