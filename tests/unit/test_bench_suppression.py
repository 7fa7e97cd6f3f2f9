"""``bench suppression``'s family tables (Qwen-Image, Wan 2.1, Flux.2 on ComfyUI 0.29): sizes, token counts,
flag checks, and a --small smoke run of the real nodes in a subprocess (needs COMFYUI_PATH; timing values
are printed, never asserted)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from erasers_dev.bench import suppression
from erasers_dev.bench import suppression_families as fam

ROOT = Path(__file__).resolve().parents[2]


def test_working_resolutions_give_the_hosts_token_counts():
    # Qwen-Image 1328²: 8× VAE, 2×2 patches → 83² ; Flux.2 1024²: 16× VAE, patch 1 → 64² ;
    # Wan 832×480×81: 21 latent frames (time 4×), 8× VAE, 2×2 patches → 21·30·52
    assert fam.image_tokens("qwen_image", fam.parse_size("qwen_image", "1328")) == 83 * 83
    assert fam.image_tokens("flux2", fam.parse_size("flux2", "1024")) == 64 * 64
    assert fam.image_tokens("wan", fam.parse_size("wan", "832x480x81")) == 21 * 30 * 52
    assert fam.latent_of("wan", (832, 480, 81)) == (1, 16, 21, 60, 104)


def test_the_variants_keep_the_real_width_and_head_layout():
    widths = {
        "qwen_image": lambda c: (c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"]),
        "wan_1.3b": lambda c: (c["dim"], c["num_heads"]),
        "wan_14b": lambda c: (c["dim"], c["num_heads"]),
        "flux2_dev": lambda c: (c["hidden_size"], c["num_heads"]),
        "flux2_klein_4b": lambda c: (c["hidden_size"], c["num_heads"]),
    }
    expected = {
        "qwen_image": (3072, 24),
        "wan_1.3b": (1536, 12),
        "wan_14b": (5120, 40),
        "flux2_dev": (6144, 48),
        "flux2_klein_4b": (3072, 24),
    }
    for name, width in widths.items():
        assert width(fam.reduced_config(name, 2)) == expected[name], name
    assert fam.reduced_config("flux2_dev", 2)["depth_single_blocks"] == 2
    assert fam.reduced_config("wan_1.3b", 3)["num_layers"] == 3


@pytest.mark.parametrize(
    "family, text", [("wan", "832x480x80"), ("wan", "832x480"), ("flux2", "1000"), ("qwen_image", "0")]
)
def test_a_size_the_host_cannot_take_is_refused_with_the_rule(family, text):
    with pytest.raises(ValueError, match="multiples of 16|4k\\+1"):
        fam.parse_size(family, text)


def test_an_unknown_family_is_refused_by_name_before_anything_runs():
    parser = argparse.ArgumentParser()
    suppression.add_arguments(parser)
    args = parser.parse_args(["--no-unet", "--no-flux", "--families", "qwen_image,sdxl"])
    with pytest.raises(ValueError, match=r"unknown \['sdxl'\].*qwen_image"):
        suppression.run(args)


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set")
def test_small_run_times_every_method_through_the_real_nodes():
    cmd = [sys.executable, "-m", "erasers", "bench", "suppression", "--small", "--no-unet", "--no-flux"]
    cmd += ["--steps", "1", "--rounds", "1", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for variant in fam.DEFAULT_VARIANTS.split(","):
        assert f"reduced {variant} (ComfyUI class" in out, out
    for method, tables in (("token suppression", 3), ("concept guidance", 3), ("SLD", 2)):  # Flux.2 refuses SLD
        timed = re.findall(rf"^{method} +(\d+\.\d) +(\d+\.\d\d) ", out, flags=re.M)
        assert len(timed) == tables and all(float(ms) > 0 for ms, _ in timed), (method, out)
    assert "SLD on Flux.2: refused by the node" in out
