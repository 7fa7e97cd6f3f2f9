import math

import pytest
import torch

from erasers.config import ConfigError
from erasers.guards import safree
from erasers_dev.testing import ToyTextEncoder


def config(**kw):
    kw.setdefault("concepts", ["nude"])
    return safree.SAFREEConfig(**kw)


def test_projection_removes_exactly_the_subspace_component():
    gen = torch.Generator().manual_seed(0)
    C = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    P = safree.projection_matrix(C)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T, atol=1e-12)
    # v = C a + w with w ⟂ span(C): (I − P) v must be exactly w
    w = torch.randn(16, generator=gen, dtype=torch.float64)
    w = w - C @ torch.linalg.lstsq(C, w[:, None]).solution[:, 0]
    v = C @ torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64) + w
    r = v - P @ v
    assert torch.allclose(r, w, atol=1e-10)
    assert torch.allclose(C.T @ r, torch.zeros(3, dtype=torch.float64), atol=1e-10)
    # collinear keywords (rank-deficient C) still give a valid projector
    P2 = safree.projection_matrix(torch.cat([C, C[:, :1] * 2], 1))
    assert torch.allclose(P2, P, atol=1e-8)


def test_flag_tokens_leave_one_out():
    d = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    assert safree.flag_tokens(d, 0.01).tolist() == [False, False, False, True, False]
    # the (1 + α) margin: 1.005 is not ≥ 1.01 × mean(others)
    d = torch.tensor([1.0, 1.005, 1.0], dtype=torch.float64)
    assert not safree.flag_tokens(d, 0.01).any()
    assert safree.flag_tokens(d, 0.0).tolist() == [False, True, False]
    # single token: compared with the unmasked prompt's distance
    assert safree.flag_tokens(torch.tensor([2.0]), 0.01, torch.tensor([1.0])).tolist() == [True]
    assert safree.flag_tokens(torch.tensor([1.0]), 0.01, torch.tensor([1.0])).tolist() == [False]


@pytest.mark.parametrize(
    "beta,k,t0,expected",
    [
        (0.3, 2.5, 5.333, 0),
        (0.7, 2.5, 5.333, 10),
        (0.5333, 2.5, 5.333, 5),
        (0.55, 3.5, 5.5, 5),
        (0.6, 3.5, 5.5, 10),
        (0.52, 2.5, 5.333, 3),
    ],
)
def test_t_prime_values(beta, k, t0, expected):
    # t′ = round(γ·sigmoid(2k(10β − t₀))), γ = 10
    assert safree.svf_t_prime(beta, 10.0, k, t0) == expected
    assert expected == round(10 / (1 + math.exp(-2 * k * (10 * beta - t0))))


def handmade(masked_pooled):
    """Prompt of 3 words in a 4-d space (positions 1..3, EOS at 4, length 5, T = 6)."""
    T, D = 6, 4
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(T, D, generator=gen)
    masked = prompt[None].repeat(len(masked_pooled), 1, 1).clone()
    for i, p in enumerate(masked_pooled):
        masked[i, 4] = torch.tensor(p)
    concept = torch.zeros(1, T, D)
    concept[0, 2] = torch.tensor([1.0, 0, 0, 0])  # keyword "BOS w EOS": pooled = e1
    return prompt, masked, concept


def test_flagged_and_unflagged_tokens_on_handmade_embeddings():
    # removing word 2 moves the sentence away from span(e1) (distance 2 vs 1): only word 2 is flagged
    prompt, masked, concept = handmade([[1.0, 1, 0, 0], [0.0, 2, 0, 0], [1.0, 1, 0, 0]])
    res = safree.analyse(
        config(include_eos=False), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3])
    )
    assert res.flagged.tolist() == [False, True, False]
    assert res.changed
    assert res.hidden[2, 0].abs() < 1e-6  # the e1 (concept) component is gone from the flagged token
    for row in (0, 1, 3, 4, 5):
        assert torch.equal(res.hidden[row], prompt[row])
    # with include_eos the EOS and padding rows are projected too
    res2 = safree.analyse(
        config(include_eos=True), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3])
    )
    assert res2.hidden[4:, 0].abs().max() < 1e-6 and torch.equal(res2.hidden[3], prompt[3])


def test_benign_prompt_is_bit_identical():
    prompt, masked, concept = handmade([[1.0, 1, 0, 0], [1.0, 1, 0, 0], [1.0, 1, 0, 0]])
    res = safree.analyse(config(), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3]))
    assert not res.flagged.any() and not res.changed
    assert res.hidden is prompt


def test_risk_gate_leaves_prompt_untouched():
    prompt, masked, concept = handmade([[1.0, 1, 0, 0], [0.0, 2, 0, 0], [1.0, 1, 0, 0]])
    res = safree.analyse(
        config(risk_gate=1.0), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3])
    )
    assert res.hidden is prompt and res.risk < 1.0


def test_svf_window_and_strength():
    prompt, masked, concept = handmade([[1.0, 1, 0, 0], [0.0, 2, 0, 0], [1.0, 1, 0, 0]])
    res = safree.analyse(config(), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3]))
    assert res.t_prime == safree.svf_t_prime(res.beta, 10.0, 2.5, 5.333)
    assert res.filter_fraction == pytest.approx((res.t_prime + 1) / 50)
    off = safree.analyse(
        config(self_validating=False),
        prompt,
        5,
        [1, 2, 3],
        masked,
        torch.tensor([5, 5, 5]),
        concept,
        torch.tensor([3]),
    )
    assert off.filter_fraction == 1.0
    half = safree.analyse(
        config(strength=0.5), prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3])
    )
    assert torch.allclose(half.hidden, prompt + 0.5 * (res.hidden - prompt), atol=1e-6)


def test_sdxl_segments_projected_per_encoder():
    T, D = 6, 2048
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randn(T, D, generator=gen)
    concept = torch.randn(2, T, D, generator=gen)
    masked = prompt[None].repeat(3, 1, 1).clone()
    masked[1, 4] = masked[1, 4] * 3  # make token 2's masked copy far from the subspace
    res = safree.analyse(
        config(include_eos=False),
        prompt,
        5,
        [1, 2, 3],
        masked,
        torch.tensor([5, 5, 5]),
        concept,
        torch.tensor([3, 3]),
        segments=safree.SEGMENTS["sdxl"],
    )
    assert res.flagged.tolist() == [False, True, False]
    for a, b in safree.SEGMENTS["sdxl"]:
        C = concept[:, 2, a:b].double()
        # the projected token has no component in that encoder's concept span
        coef = torch.linalg.lstsq(C.T, res.hidden[2, a:b].double()[:, None]).solution
        assert (C.T @ coef).norm() < 1e-6 * res.hidden[2, a:b].norm()


def test_t5_mode_projects_every_token_and_pooled_keeps_norm():
    T, D = 8, 32
    gen = torch.Generator().manual_seed(3)
    concept = torch.randn(2, T, D, generator=gen)
    prompt = torch.randn(T, D, generator=gen) + 2 * concept[0].mean(0)
    masked = prompt[None].repeat(3, 1, 1).clone()
    basis = safree.pool(concept, torch.tensor([4, 4]), "mean")
    w = torch.randn(D, generator=gen)
    w = w - basis.T @ torch.linalg.lstsq(basis.T, w[:, None]).solution[:, 0]
    masked[0] = masked[0] + 5 * w  # masking word 0 moves the sentence away from the concept span
    y, yc = torch.randn(16, generator=gen), torch.randn(2, 16, generator=gen)
    res = safree.analyse(
        config(),
        prompt,
        4,
        [0, 1, 2],
        masked,
        torch.tensor([4, 4, 4]),
        concept,
        torch.tensor([4, 4]),
        encoder="t5",
        prompt_pooled=y,
        concept_pooled=yc,
    )
    assert res.flagged[0] and res.changed and res.info["projected_rows"] == T
    basis = safree.pool(concept, torch.tensor([4, 4]), "mean").double()
    assert (res.hidden.double() @ basis.T).abs().max() < 1e-5 * basis.norm()
    assert res.pooled.norm() == pytest.approx(float(y.norm()), rel=1e-5)
    assert (res.pooled.double() @ yc.double().T).abs().max() < 1e-5 * float(y.norm() * yc.norm())


def test_toy_encoder_end_to_end_flags_the_concept_word():
    enc = ToyTextEncoder(dim=64, context_length=16, seed=4)
    cfg = config(concepts=["nude"], include_eos=False)
    prompt = "a photo of nude person"
    ids = enc.tokenize(prompt)
    positions, copies = safree.masked_copies(ids, has_bos=True, mask_id=0)
    assert positions == [1, 2, 3, 4, 5]
    p = enc.encode_ids([ids])
    m = enc.encode_ids(copies)
    c = enc.encode(cfg.concepts)
    res = safree.analyse(cfg, p.hidden[0], int(p.lengths[0]), positions, m.hidden, m.lengths, c.hidden, c.lengths)
    flagged = [pos for pos, f in zip(positions, res.flagged.tolist()) if f]
    assert 4 in flagged  # "nude"
    benign = enc.encode(["a photo of a house"])
    assert not torch.equal(benign.hidden, p.hidden)


def test_config_validates_and_serialises():
    c = safree.SAFREEConfig()
    assert len(c.concepts) == 17 and c.concepts[0] == "Sexual Acts"
    assert safree.SAFREEConfig(preset="artists").svf_k == 3.5
    again = safree.SAFREEConfig.from_dict(c.to_dict())
    assert again == c
    with pytest.raises(ConfigError):
        safree.SAFREEConfig(alpha=-1)
    with pytest.raises(ConfigError):
        safree.SAFREEConfig(preset="nope")
    with pytest.raises(ConfigError):
        safree.SAFREEConfig(start_percent=0.8, end_percent=0.2)
    assert safree.joined_keywords(safree.SAFREEConfig(concepts=["a", "b"])) == "a, b"
