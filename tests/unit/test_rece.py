"""RECE: the §4.1 derivation, the shared-factor algorithm against a per-layer reference, rounds, shapes."""

import pytest
import torch

from erasers.config import ConfigError
from erasers.edits import rece, uce
from erasers.edits.closed_form import apply_ridge
from erasers.edits.eraser import compute_eraser
from erasers.edits.methods import get_method
from erasers.files.families import Family, layer_specs
from erasers_dev.testing import ToyTextEncoder, layer_shapes, layer_weights

D = 16


def small_model(seed=0):
    shapes = layer_shapes(Family.UNET, context_dim=D)
    weights = layer_weights(Family.UNET, seed=seed, context_dim=D)
    return weights, layer_specs(shapes, Family.UNET)


def small_encoder():
    return ToyTextEncoder(dim=D, context_length=8, vocab=256)


def reference_rece(cfg, encoder, weights, specs):
    """RECE layer by layer, straight from §4.1/§4.2 (UCE start from the uce module, explicit sums)."""
    start = uce.erase(cfg.uce_start(), encoder, weights, specs)
    w0 = {s.key: weights[s.key].double() for s in specs}
    w = {k: w0[k] + start[k].dense(torch.float64) for k in w0}
    c = encoder.encode(cfg.concepts).hidden.reshape(-1, D).double()
    c_star = encoder.encode(cfg.anchors_for_concepts(cfg.default_anchor())).hidden.reshape(-1, D).double()
    p = encoder.encode([""] + cfg.preserve).hidden.reshape(-1, D).double()
    for _ in range(cfg.effective_epochs()):
        gram_cur, gram_cross = rece.weight_grams(list(w.values()), [w0[k] for k in w])
        c_prime = rece.derive_adversarial_embedding(c, gram_cur, gram_cross, cfg.effective_regular_scale())
        omega = torch.cat([torch.full((len(c),), cfg.erase_scale), torch.full((len(p),), cfg.preserve_scale)])
        for k in w:
            keys = torch.cat([c_prime, p])
            targets = torch.cat([c_star @ w[k].T, p @ w[k].T])  # W_cur for targets (§4.2)
            w[k] = apply_ridge(w[k], cfg.lam, keys, targets, omega.double())  # and the λ2 anchor
    return {k: w[k] - w0[k] for k in w}


def test_derived_embedding_has_zero_gradient():
    gen = torch.Generator().manual_seed(1)
    orig = [torch.randn(o, D, generator=gen, dtype=torch.float64) for o in (5, 9, 12)]
    cur = [w + 0.3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in orig]
    c = torch.randn(4, D, generator=gen, dtype=torch.float64)
    lam_r = 0.1
    c_prime = rece.derive_adversarial_embedding(c, *rece.weight_grams(cur, orig), lam_r)
    # ∇_c′ [Σ_l ‖W_l c′ − W_l⁰ c‖² + λ_r ‖c′‖²] = 2 Σ_l W_lᵀ(W_l c′ − W_l⁰ c) + 2 λ_r c′
    grad = sum(2 * (c_prime @ w.T - c @ w0.T) @ w for w, w0 in zip(cur, orig)) + 2 * lam_r * c_prime
    scale = sum((c @ w0.T).norm() * w.norm() for w, w0 in zip(cur, orig))
    assert float(grad.abs().max() / scale) < 1e-12
    # unedited weights and λ_r → 0 give back the concept itself
    same = rece.derive_adversarial_embedding(c, *rece.weight_grams(orig, orig), 1e-12)
    torch.testing.assert_close(same, c, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("concepts", [["van gogh"], ["van gogh", "claude monet", "edvard munch"]])
def test_shared_factor_algorithm_equals_per_layer_reference(concepts):
    # 1 concept: 8 rows < d (exact factors); 3 concepts: 24 rows ≥ d (dense shared update)
    weights, specs = small_model()
    encoder = small_encoder()
    cfg = rece.RECEConfig(concepts=concepts, concept_type="nudity", preserve=["a cat"])  # 3 epochs
    got = rece.erase(cfg, encoder, weights, specs)
    want = reference_rece(cfg, encoder, weights, specs)
    assert set(got) == set(want) == {s.key for s in specs}
    for key in want:
        err = float((got[key].dense(torch.float64) - want[key]).norm() / want[key].norm())
        assert err < 1e-5, (key, err)


def rounds(cfg_kwargs, encoder, weights, specs, n_rounds):
    """Shared M_k = I + X_k Y_k after k rounds (k = 0 is the UCE start)."""
    out = []
    for k in range(n_rounds + 1):
        cfg = rece.RECEConfig(**cfg_kwargs, epochs=k)
        encodings = rece.encode_inputs(cfg, encoder)
        x, y = rece.stream_delta(cfg, cfg.uce_start(), encodings, [weights[s.key] for s in specs], False)
        out.append(torch.eye(D, dtype=torch.float64) + x @ y)
    return out


def test_each_round_removes_the_concept_from_its_adversarial_embedding():
    weights, specs = small_model()
    encoder = small_encoder()
    kwargs = dict(concepts=["nudity"], concept_type="nudity")
    ms = rounds(kwargs, encoder, weights, specs, 3)
    w0 = [weights[s.key].double() for s in specs]
    c = encoder.encode(["nudity"]).hidden[0].double()
    c_star = encoder.encode([""]).hidden[0].double()
    for k in range(3):
        cur = [w @ ms[k] for w in w0]
        nxt = [w @ ms[k + 1] for w in w0]
        c_prime = rece.derive_adversarial_embedding(c, *rece.weight_grams(cur, w0), 0.1)
        # how well c′ regenerates the original concept outputs W⁰c: before vs after the round's edit
        before = sum(float((c_prime @ w.T - c @ o.T).norm() ** 2) for w, o in zip(cur, w0))
        after = sum(float((c_prime @ w.T - c @ o.T).norm() ** 2) for w, o in zip(nxt, w0))
        assert after > 1.5 * before, (k, before, after)
        # and the edited model's response to c′ moved towards its response to the anchor
        to_anchor_before = sum(float((c_prime @ w.T - c_star @ w.T).norm()) for w in cur)
        to_anchor_after = sum(float((c_prime @ w.T - c_star @ v.T).norm()) for w, v in zip(nxt, cur))
        assert to_anchor_after < to_anchor_before, (k, to_anchor_before, to_anchor_after)


def test_zero_epochs_is_the_uce_start():
    weights, specs = small_model()
    encoder = small_encoder()
    cfg = rece.RECEConfig(concepts=["van gogh"], concept_type="art", epochs=0)
    got = rece.erase(cfg, encoder, weights, specs)
    want = uce.erase(cfg.uce_start(), encoder, weights, specs)
    for key in want:
        torch.testing.assert_close(got[key].dense(), want[key].dense(), rtol=1e-5, atol=1e-6)


def test_uce_start_follows_the_published_configs():
    assert rece.RECEConfig(concepts=["x"], concept_type="nudity").uce_start().effective_preserve_scale(1) == 1.0
    art = rece.RECEConfig(concepts=["x"], concept_type="art").uce_start()
    assert art.effective_preserve_scale(1) == 0.1 and art.default_anchor() == "art" and art.variant == "2023"
    obj = rece.RECEConfig(concepts=["x"], concept_type="object").uce_start()
    assert obj.default_anchor() == " " and obj.effective_preserve_scale(20) == 0.1


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=-1),
        dict(epochs=1.5),
        dict(regular_scale=-1.0),
        dict(lam=float("nan")),
        dict(lam=0.0, preserve_scale=0.0),
        dict(concept_type="unsafe"),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        rece.RECEConfig(concepts=["x"], **bad)


def test_presets_and_defaults_match_the_paper():
    p = rece.RECEConfig.PRESETS
    assert (p["nudity"]["epochs"], p["nudity"]["regular_scale"]) == (3, 0.1)
    assert (p["unsafe"]["epochs"], p["unsafe"]["regular_scale"]) == (2, 0.1)
    assert (p["art"]["epochs"], p["art"]["regular_scale"], p["art"]["uce_preserve_scale"]) == (1, 1e-3, 0.1)
    assert p["object-hard"]["regular_scale"] == 1e-3 and p["object-easy"]["regular_scale"] == 0.1
    cfg = rece.RECEConfig.from_preset("art", concepts=["x"])
    assert (cfg.effective_epochs(), cfg.effective_regular_scale()) == (1, 1e-3)
    d = rece.RECEConfig(concepts=["x"])
    assert (d.lam, d.preserve_scale, d.erase_scale) == (0.1, 0.1, 1.0)
    assert rece.RECEConfig.from_dict(d.to_dict()) == d
    with pytest.raises(ConfigError):
        rece.RECEConfig.from_preset("nope", concepts=["x"])


def test_sd15_shapes_end_to_end():
    cfg = rece.RECEConfig(concepts=["Van Gogh", "Claude Monet"], concept_type="art")
    eraser = compute_eraser(cfg, ToyTextEncoder(), layer_weights(Family.SD1))
    assert len(eraser.deltas) == 32 and get_method("rece").name == "rece"
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in eraser.deltas)
    for key, delta in eraser.deltas.items():
        assert delta.is_finite() and delta.shape[1] == 768 and delta.dense().abs().max() > 0


@pytest.mark.slow  # 4096-wide closed forms on a 2-core CPU: ~20–40 s
def test_flux_shapes_end_to_end():
    encoder = ToyTextEncoder(dim=4096, pooled_dim=768, has_bos=False, family="flux", context_length=16)
    weights = layer_weights(Family.FLUX)
    eraser = compute_eraser(rece.RECEConfig(concepts=["a cat"]), encoder, weights)
    assert set(eraser.deltas) == {"txt_in.weight", "vector_in.in_layer.weight"}
    assert eraser.deltas["txt_in.weight"].shape == (3072, 4096)
    assert eraser.deltas["vector_in.in_layer.weight"].shape == (3072, 768)
    assert all(d.is_finite() for d in eraser.deltas.values())
