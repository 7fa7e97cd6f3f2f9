"""MACE closed-form refinement: token matching, the closed form's own equations, s applied once, presets."""

import logging

import pytest
import torch

from erasers.config import ConfigError
from erasers.edits import mace
from erasers.edits.eraser import compute_eraser
from erasers.files.families import Family, layer_specs
from erasers_dev.testing import ToyTextEncoder, layer_shapes, layer_weights

D = 16


def test_find_matching_indices_prefix_suffix_and_padding():
    enc = ToyTextEncoder(dim=8, context_length=12)
    old = enc.tokenize("adam driver in a photo")  # BOS adam driver in a photo EOS
    new = enc.tokenize("a person in a photo")
    o, n = mace.find_matching_indices(old, new, 12)
    assert o == n == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # SOT, "in a photo", EOS, padding
    old = enc.tokenize("x in a photo")  # 6 ids vs 7: the padding runs are aligned and cut to equal length
    o, n = mace.find_matching_indices(old, new, 12)
    assert o == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10] and n == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # an empty mapping: the concept's tokens are dropped, everything else lines up
    o, n = mace.find_matching_indices(enc.tokenize("cat in a photo"), enc.tokenize("in a photo"), 12)
    assert o[:5] == [0, 2, 3, 4, 5] and n[:5] == [0, 1, 2, 3, 4] and len(o) == len(n)
    # identical prompts match everywhere
    ids = enc.tokenize("a photo")
    assert mace.find_matching_indices(ids, ids, 12) == (list(range(12)), list(range(12)))


def test_templates_and_general_prompts():
    assert len(mace.OBJECT_TEMPLATES) == len(mace.STYLE_TEMPLATES) == 31
    assert all(t.count("{}") == 1 for t in mace.OBJECT_TEMPLATES + mace.STYLE_TEMPLATES)
    cfg = mace.MACEConfig(concepts=["x"], concept_type="art")
    assert len(cfg.templates()) == 30 and cfg.templates()[0] == "An artwork by {}"
    assert mace.fill("{} in a photo", "") == "in a photo"
    prompts = mace.load_general_prompts()
    assert 180 <= len(prompts) <= 260 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)


def matched_rows(cfg, encoder):
    """E_f, E_g built directly from the prompts (independently of mace.erase_grams)."""
    e_f, e_g = [], []
    for concept, mapping in zip(cfg.concepts, cfg.anchors_for_concepts(cfg.default_anchor())):
        for t in cfg.templates():
            old, new = encoder.encode([mace.fill(t, concept)]), encoder.encode([mace.fill(t, mapping)])
            o, n = mace.find_matching_indices(old.token_ids[0], new.token_ids[0], encoder.context_length)
            e_f.append(old.hidden[0, o])
            e_g.append(new.hidden[0, n])
    return torch.cat(e_f).double(), torch.cat(e_g).double()


def all_rows(encoder, prompts):
    return encoder.encode(prompts).hidden.reshape(-1, encoder.dim).double()


@pytest.mark.parametrize("n_templates", [1, 30])  # rows < d (exact factors) and rows ≥ d (dense update)
def test_closed_form_satisfies_its_normal_equations(n_templates):
    encoder = ToyTextEncoder(dim=D, context_length=16, vocab=256)
    shapes = layer_shapes(Family.UNET, context_dim=D)
    weights = layer_weights(Family.UNET, context_dim=D)
    specs = layer_specs(shapes, Family.UNET)
    lam, s, omega = 0.3, 1e-2, 5.0
    cfg = mace.MACEConfig(
        concepts=["adam driver"],
        concept_type="celebrity",
        preserve=["a dog"],
        lam=lam,
        train_preserve_scale=s,
        preserve_weight=omega,
        n_templates=n_templates,
    )
    deltas = mace.erase(cfg, encoder, weights, specs)
    e_f, e_g = matched_rows(cfg, encoder)
    gen, dom = all_rows(encoder, mace.load_general_prompts()), all_rows(encoder, ["a dog"])
    for spec in specs[:4]:
        w = weights[spec.key].double()
        w_new = w + deltas[spec.key].dense(torch.float64)
        # ∇ of Σ‖W′e^f − We^g‖² + s(Σ_gen‖(W′−W)e‖² + ω Σ_dom‖(W′−W)e‖²) + λ‖W′ − W‖²  (s once, not s²)
        grad = (
            (e_f @ w_new.T - e_g @ w.T).T @ e_f
            + s * ((gen @ (w_new - w).T).T @ gen + omega * (dom @ (w_new - w).T).T @ dom)
            + lam * (w_new - w)
        )
        scale = float((e_g @ w.T).T.abs().max() * e_f.abs().max() * len(e_f))
        assert float(grad.abs().max()) / scale < 1e-7, spec.key
        assert float((w_new - w).norm()) > 1e-3 * float(w.norm())


def test_lambda_zero_with_rank_deficient_preservation_falls_back(caplog):
    d = 64
    encoder = ToyTextEncoder(dim=d, context_length=8, vocab=256)
    shapes = {"a.attn2.to_k.weight": (24, d), "a.attn2.to_v.weight": (24, d)}
    weights = layer_weights(Family.UNET, shapes=shapes)
    specs = layer_specs(shapes, Family.UNET)
    cfg = mace.MACEConfig(
        concepts=["adam driver"],
        concept_type="celebrity",
        preserve=["a dog"],
        lam=0.0,
        general_prior=False,
        n_templates=2,
    )
    with caplog.at_level(logging.WARNING, logger="erasers.edits.mace"):
        deltas = mace.erase(cfg, encoder, weights, specs)
    assert "singular" in caplog.text
    assert all(dl.is_finite() for dl in deltas.values())


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_templates=0),
        dict(n_templates=32),
        dict(lam=-1.0),
        dict(preserve_weight=float("nan")),
        dict(concept_type="style"),
        dict(concept_type="object", lam=0.0),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        mace.MACEConfig(concepts=["x"], **bad)


def test_presets_and_defaults_match_the_table():
    p = mace.MACEConfig.PRESETS
    row = lambda name: (p[name]["lam"], p[name]["train_preserve_scale"], p[name]["preserve_weight"])
    assert row("celebrity-1") == (0.0, 1e-4, 8e3) and row("celebrity-5") == (0.0, 1e-4, 5e4)
    assert row("celebrity-10") == (0.0, 1e-4, 8e4) and row("celebrity-100") == (0.0, 1e-4, 2e5)
    assert row("art-100") == (0.0, 1e-4, 8e4) and row("explicit") == (0.0, 7e-7, 0.0)
    assert [p[f"cifar-{o}"]["lam"] for o in ("ship", "automobile", "bird")] == [1e3, 1e2, 1e1]
    cele = mace.MACEConfig(concepts=[f"person {i}" for i in range(10)], concept_type="celebrity")
    assert (cele.effective_lam(), cele.effective_scale(), cele.effective_omega()) == (0.0, 1e-4, 8e4)
    assert mace.MACEConfig(concepts=["a"], concept_type="celebrity").effective_omega() == 8e3
    assert mace.MACEConfig(concepts=["nudity"], concept_type="nudity").default_anchor() == "a person wearing clothes"
    assert mace.MACEConfig(concepts=["a"], concept_type="art").default_anchor() == "art"
    cfg = mace.MACEConfig.from_preset("cifar-ship", concepts=["ship"])
    assert cfg.anchors == ["ground"] and mace.MACEConfig.from_dict(cfg.to_dict()) == cfg


def test_sd15_shapes_end_to_end():
    cfg = mace.MACEConfig(concepts=["Adam Driver"], concept_type="celebrity", preserve=["Tom Hanks"])
    eraser = compute_eraser(cfg, ToyTextEncoder(), layer_weights(Family.SD1))
    assert len(eraser.deltas) == 32
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in eraser.deltas)
    assert all(d.is_finite() for d in eraser.deltas.values())


@pytest.mark.slow  # 4096-wide closed forms on a 2-core CPU: ~20–40 s
def test_flux_shapes_end_to_end():
    encoder = ToyTextEncoder(dim=4096, pooled_dim=768, has_bos=False, family="flux", context_length=16)
    cfg = mace.MACEConfig(concepts=["a cat"], concept_type="object", anchors=["a dog"], n_templates=10)
    eraser = compute_eraser(cfg, encoder, layer_weights(Family.FLUX))
    assert set(eraser.deltas) == {"txt_in.weight", "vector_in.in_layer.weight"}
    assert all(d.is_finite() for d in eraser.deltas.values())
