"""diffusers suppression with an attention mask: the mask composes with the suppression, never skips it (#13).

Before, any call with an ``encoder_attention_mask`` ran the layer's original processor: the suppression was
silently off (fail-open). Both are additive logit biases, so masking token j with the caller's mask must
equal adding its −10000 bias to the token bias, and the suppression must still change the output.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_diffusers_suppression import tiny_unet  # noqa: E402  (the same tiny UNet)

from erasers.errors import EraserError  # noqa: E402
from erasers.guards import token_suppress as ts  # noqa: E402
from erasers_diffusers import suppression as ds  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


CTX = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1]], dtype=torch.float32)  # the caller's padding mask


def run(unet, mask=None):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 10]), encoder_hidden_states=CTX, encoder_attention_mask=mask).sample


def token_bias():
    chosen = torch.zeros(6, dtype=torch.bool)
    chosen[2] = True
    return torch.stack([ts.logit_bias(chosen, 0.0), ts.logit_bias(chosen, 0.0)])


def states():
    yield "token bias", lambda b: ds.SuppressionState(token_bias=b)
    nag = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(4))
    yield "bias + NAG", lambda b: ds.SuppressionState(token_bias=b, nag_context=nag, nag_rows=torch.tensor([0, 1]))


@pytest.mark.parametrize("name,make", list(states()))
def test_mask_composes_with_suppression(unet, name, make):
    masked_base = run(unet, MASK)
    with ds.SuppressionProcessors(unet) as ctl:
        ctl.state = make(token_bias())
        masked = run(unet, MASK)
        assert ctl.state.calls["bias"] > 0, "the suppression processor never ran with a mask"
        # the same masking expressed as part of the token bias, with no caller mask
        ctl.state = make(token_bias() + (1 - MASK) * -10000.0)
        folded = run(unet, None)
    assert torch.allclose(masked, folded, atol=1e-5), (name, (masked - folded).abs().max())
    assert not torch.allclose(masked, masked_base, atol=1e-4), f"{name}: suppression skipped under a mask"


def test_mask_alone_matches_the_host_and_a_boolean_mask_works(unet):
    with ds.SuppressionProcessors(unet) as ctl:
        ctl.state = ds.SuppressionState(token_bias=torch.zeros(2, 6))  # active, but a zero bias
        assert torch.allclose(run(unet, MASK), run_plain(unet, MASK), atol=1e-6)
        proc = next(p for n, p in unet.attn_processors.items() if ".attn2." in n)
        assert isinstance(proc, ds.SuppressionAttnProcessor)
        as_bool = ds.additive_mask(MASK.bool(), torch.float32, 6)
        assert torch.equal(as_bool, ((1 - MASK) * -10000.0)[:, None, :])


def run_plain(unet, mask):
    originals = dict(unet.attn_processors)
    try:
        unet.set_attn_processor({n: getattr(p, "original", p) for n, p in originals.items()})
        return run(unet, mask)
    finally:
        unet.set_attn_processor(originals)


def test_a_mask_over_other_keys_is_refused_not_skipped():
    with pytest.raises(EraserError, match="not skipped"):
        ds.additive_mask(torch.zeros(2, 1, 9), torch.float32, 6)
