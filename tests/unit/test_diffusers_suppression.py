import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from erasers.guards import safree  # noqa: E402  (after importorskip)
from erasers.guards import token_suppress as ts  # noqa: E402  (after importorskip)
from erasers_dev.testing import ToyTextEncoder  # noqa: E402  (after importorskip)
from erasers_diffusers import suppression as ds  # noqa: E402  (after importorskip)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def run(unet, ctx):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 10]), encoder_hidden_states=ctx).sample


def test_install_remove_and_no_state_is_bit_identical():
    unet = tiny_unet()
    ctx = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    before = run(unet, ctx)
    originals = dict(unet.attn_processors)
    ctl = ds.SuppressionProcessors(unet).install()
    assert ctl.cross_attention_names() and all(".attn2." in n for n in ctl.cross_attention_names())
    assert torch.equal(run(unet, ctx), before)  # no state → the original processor runs
    ctl.remove()
    assert all(unet.attn_processors[k] is v for k, v in originals.items())


def test_token_bias_and_nag_act_on_positive_rows_only():
    unet = tiny_unet()
    ctx = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1)
    before = run(unet, ctx)
    with ds.SuppressionProcessors(unet) as ctl:
        mask = torch.zeros(6, dtype=torch.bool)
        mask[2] = True
        bias = torch.stack([torch.zeros(6), ts.logit_bias(mask, 0.0)])
        ctl.state = ds.SuppressionState(token_bias=bias)
        out = run(unet, ctx)
        assert ctl.state.calls["bias"] > 0
        assert torch.allclose(out[0], before[0], atol=1e-5) and not torch.allclose(out[1], before[1], atol=1e-4)
        ctl.state = ds.SuppressionState(nag_context=torch.randn(1, 5, 16), nag_rows=torch.tensor([1]))
        out = run(unet, ctx)
        assert ctl.state.calls["nag"] > 0
        assert torch.allclose(out[0], before[0], atol=1e-5) and not torch.allclose(out[1], before[1], atol=1e-4)


def test_safree_embeds_with_an_id_encoder():
    enc = ToyTextEncoder(dim=64, context_length=16, seed=4)
    res = ds.safree_embeds(enc, "a photo of nude person", safree.SAFREEConfig(concepts=["nude"]))
    assert res.hidden.shape == (16, 64)
    assert res.changed and 4 in res.info["flagged_positions"]
