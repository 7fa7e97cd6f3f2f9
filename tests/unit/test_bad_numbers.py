"""Non-finite or ill-typed numbers are refused before anything runs; a file with NaN/Inf is never applied."""

import math

import pytest
import torch
from safetensors.torch import save_file

from erasers.config import ConfigError
from erasers.edits.methods import METHODS
from erasers.errors import BadEraserFile
from erasers.files.eraser_file import read_safetensors


def numeric_fields(config_cls):
    """(name, default) of every float field the method's config declares (its hyper-parameters)."""
    import dataclasses

    probe = config_cls(concepts=["x"])
    return [
        (f.name, getattr(probe, f.name))
        for f in dataclasses.fields(config_cls)
        if isinstance(getattr(probe, f.name), float) and not isinstance(getattr(probe, f.name), bool)
    ]


CASES = [
    (method, name, bad)
    for method, entry in sorted(METHODS.items())
    for name, _ in numeric_fields(entry.config_class)
    for bad in (math.nan, math.inf)
]


def config_class(method):
    return METHODS[method].config_class


@pytest.mark.parametrize("method,name,bad", CASES)
def test_every_method_refuses_non_finite_hyper_parameters(method, name, bad):
    with pytest.raises(ConfigError, match=name):
        config_class(method)(concepts=["x"], **{name: bad})


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True, math.nan])
def test_rank_cap_is_a_whole_number_at_least_one(bad):
    with pytest.raises(ConfigError, match="rank_cap"):
        config_class("uce")(concepts=["x"], rank_cap=bad)


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_a_file_with_non_finite_values_is_refused(tmp_path, poison):
    up = torch.zeros(4, 1)
    up[2, 0] = poison
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": torch.ones(1, 4)}, str(path))
    before = path.read_bytes()
    with pytest.raises(BadEraserFile, match="non-finite"):
        read_safetensors(str(path))
    assert path.read_bytes() == before
