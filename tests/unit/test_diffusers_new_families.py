"""The newer families' diffusers denoisers are refused by name (not mistaken for a UNet) until the diffusers
API maps their text entry points; tiny random-weight transformers built from config, no downloads."""

from types import SimpleNamespace

import pytest

diffusers = pytest.importorskip("diffusers")

from erasers.errors import UnsupportedFamily  # noqa: E402
from erasers_diffusers import api  # noqa: E402


def tiny(name):
    if name == "QwenImageTransformer2DModel":
        return diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name,label", [("QwenImageTransformer2DModel", "Qwen-Image"), ("WanTransformer3DModel", r"Wan 2\.1/2\.2")]
)
def test_a_new_family_transformer_is_refused_by_name(name, label):
    if not hasattr(diffusers, name):
        pytest.skip(f"this diffusers has no {name}")
    pipe = SimpleNamespace(transformer=tiny(name))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    for call in (api.pipeline_family, api.canonical_weights):
        with pytest.raises(UnsupportedFamily, match=rf"{label} \({name}\) is not supported through the diffusers"):
            call(pipe)
    assert all((v == before[k]).all() for k, v in pipe.transformer.state_dict().items())


def test_every_named_class_exists_in_diffusers_or_is_documented():
    # the table names diffusers classes; a typo would silently stop refusing
    missing = [n for n in api.NOT_YET_IN_DIFFUSERS if not hasattr(diffusers, n)]
    assert not missing, missing
