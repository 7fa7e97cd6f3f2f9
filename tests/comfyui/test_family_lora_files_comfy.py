"""Eraser files and erasure LoRAs on the newer families, against ComfyUI's own LoRA loader.

The tiny random-weight models are ComfyUI's own classes (Chroma, Flux.2, Qwen-Image, Lumina 2, Z-Image,
Wan 2.1), built as in test_closed_form_families_comfy.py. ComfyUI's ``comfy.lora.model_lora_keys_unet``
is the oracle for which LoRA names a model reads:
- the pack's name table (erasers/files/keys.py ``comfy_lora_names``) equals it, name for name;
- an eraser file the pack saves loads through ``comfy.sd.load_lora_for_models`` (what the stock LoraLoader
  node calls) with every key used, and patches the weights exactly as the pack's Load Eraser does;
- a LoRA written in each of ComfyUI's spellings for the family patches the same weights through the pack's
  Load Erasure LoRA node as through ComfyUI's loader;
- a LoRA in names ComfyUI does not read for the family is refused naming the family and the keys.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import save_file
from test_closed_form_families_comfy import FAMILIES, build

PREFIX = "diffusion_model."


@pytest.fixture(scope="module")
def pack(comfy):
    import importlib

    from test_closed_form_nodes import PACK, import_pack

    import_pack()
    mod = lambda name: importlib.import_module(f"{PACK}.{name}")  # noqa: E731
    return dict(
        closed_form=mod("nodes.closed_form"),
        adapters=mod("nodes.adapters"),
        lora=mod("nodes.lora"),
        files=mod("erasers.files.eraser_file"),
        keys=mod("erasers.files.keys"),
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, comfy):
    import comfy.model_base as mb

    if not hasattr(mb, FAMILIES[request.param][0]):
        pytest.skip(f"this ComfyUI has no {FAMILIES[request.param][0]} class")
    patcher, clip, _ = build(comfy, request.param)
    return request.param, patcher, clip


def shapes_of(patcher) -> dict:
    sd = patcher.model.diffusion_model.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def host_table(comfy, patcher) -> dict:
    """ComfyUI's LoRA name → target for the model's ``.weight`` keys (canonical names, offsets as tuples);
    targets carrying a function (Flux's norm_out row swap) are left out, as the pack leaves them out."""
    shapes = shapes_of(patcher)
    table = {}
    for name, target in comfy.lora.model_lora_keys_unet(patcher.model, {}).items():
        if isinstance(target, tuple):
            if len(target) > 2:
                continue
            key, offset = target[0][len(PREFIX) :], target[1]
            target = key if offset is None else (key, tuple(offset))
        else:
            key = target = target[len(PREFIX) :]
        if key.endswith(".weight") and key in shapes:
            table[name] = target
    return table


def patched_weights(model) -> dict:
    """The diffusion model's weights with ``model``'s patches applied by ComfyUI, then unpatched."""
    model.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))


def assert_same_weights(a: dict, b: dict, base: dict, expect_changed=None):
    changed = sorted(k for k in base if not torch.equal(a[k], base[k]))
    assert changed, "nothing was patched"
    if expect_changed is not None:
        assert changed == sorted(expect_changed)
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_the_pack_name_table_is_comfyuis(comfy, pack, family):
    name, patcher, _ = family
    mine = pack["keys"].comfy_lora_names(shapes_of(patcher), name)
    mine = {n: (t[0], tuple(t[1])) if isinstance(t, tuple) else t for n, t in mine.items()}
    host = host_table(comfy, patcher)
    # every name the host reads, the pack reads; ComfyUI 0.29 reads exactly these, 0.3.64 fewer (no
    # DiffSynth bare names, no LoKr linear_in/out spellings), which the pack still reads as 0.29 does
    assert set(host) <= set(mine), sorted(set(host) - set(mine))[:5]
    if "context_embedder" in host or name not in ("chroma", "flux2"):
        assert set(mine) == set(host), (sorted(set(mine) - set(host))[:5], sorted(set(host) - set(mine))[:5])
    differ = {n for n in host if mine[n] != host[n]}
    # the one deliberate difference: ComfyUI slices a Flux single block's MLP input as 4H rows, which only
    # holds at mlp_ratio 4; the pack takes the rows linear1 has after q/k/v (the tiny models use ratio 2)
    assert all(n.endswith("proj_mlp") and mine[n][1][:2] == host[n][1][:2] for n in differ), sorted(differ)[:4]
    for n in differ:
        key, (_, start, length) = mine[n]
        assert start + length == shapes_of(patcher)[key][0] and host[n][1][2] == start * 4 // 3


def test_a_flux_mlp_lora_at_another_ratio_gets_the_rows_the_model_has(comfy, pack, tmp_path):
    """Chroma with mlp_ratio 2: linear1 has 3H + 2H rows. ComfyUI's own loader overruns it (4H rows from
    3H); the pack puts a proj_mlp LoRA on rows [3H, 5H)."""
    patcher, _, _ = build(comfy, "chroma")
    shapes = shapes_of(patcher)
    rows, hidden = shapes["single_blocks.0.linear1.weight"][0], shapes["img_in.weight"][0]
    names = {
        "transformer.single_transformer_blocks.0.proj_mlp": (
            "single_blocks.0.linear1.weight",
            (0, 3 * hidden, rows - 3 * hidden),
        )
    }
    lora = write_lora(tmp_path / "chroma-mlp.safetensors", names, shapes, "peft", seed=6)
    ours = run_node(pack, tmp_path, patcher, "chroma-mlp.safetensors")
    base, after = patched_weights(patcher), patched_weights(ours)
    key = "single_blocks.0.linear1.weight"
    up = lora["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    down = lora["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    torch.testing.assert_close(after[key][3 * hidden :], base[key][3 * hidden :] + up @ down)
    assert torch.equal(after[key][: 3 * hidden], base[key][: 3 * hidden])


@pytest.mark.parametrize("method", ["uce", "rece"])  # low-rank factors (UCE) and dense .diff layers (RECE)
def test_an_eraser_file_loads_in_comfyuis_lora_loader_as_the_pack_applies_it(
    comfy, pack, family, method, tmp_path, caplog
):
    eraser_file_round_trip(comfy, pack, *family, method, tmp_path, caplog)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_an_auraflow_eraser_file_loads_in_comfyuis_lora_loader_as_the_pack_applies_it(
    comfy, pack, method, tmp_path, caplog
):
    import comfy.model_base as mb

    if not hasattr(mb, "AuraFlow"):
        pytest.skip("this ComfyUI has no AuraFlow class")
    patcher, clip, _ = build(comfy, "auraflow")
    eraser_file_round_trip(comfy, pack, "auraflow", patcher, clip, method, tmp_path, caplog)


def eraser_file_round_trip(comfy, pack, name, patcher, clip, method, tmp_path, caplog):
    """Save Eraser's file, applied by the pack's Load Eraser and by ComfyUI's own LoRA loader (every key
    loaded), patches what the closed-form node patched."""
    erased, eraser = (
        pack["closed_form"]
        .EraserClosedForm.execute(patcher, clip, method, "Van Gogh", "a painter", "a photo of a cat", 1.0)
        .args
    )
    path = pack["files"].save_eraser(eraser, str(tmp_path / f"{name}-{method}.safetensors"), exact=True)
    ours = pack["adapters"].apply_eraser(patcher, pack["files"].load_eraser(path), 1.0)

    lora = comfy.utils.load_torch_file(path, safe_load=True)
    with caplog.at_level(logging.WARNING):
        theirs, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert sorted(theirs.patches) == sorted(ours.patches) == sorted(PREFIX + k for k in eraser.keys())
    base = patched_weights(patcher)
    theirs_w, ours_w = patched_weights(theirs), patched_weights(ours)
    assert_same_weights(theirs_w, ours_w, base, [PREFIX[:0] + k for k in eraser.keys()])
    assert_same_weights(patched_weights(erased), ours_w, base)


def spellings(table: dict) -> dict:
    """ComfyUI's names grouped by spelling: prefix class → {name: target}, one name per target."""
    classes = {}
    for name, target in sorted(table.items()):
        cls = next(
            (
                p
                for p in ("lora_unet_", "lycoris_", "lora_transformer_", "transformer.", "diffusion_model.")
                if name.startswith(p)
            ),
            "bare",
        )
        group = classes.setdefault(cls, {})
        if target not in group.values():
            group[name] = target
    return classes


def write_lora(path, names: dict, shapes: dict, style: str, seed: int):
    """One rank-2 LoRA per name in ``style`` (kohya lora_up/down + alpha, or PEFT lora_A/B), sized for its
    target (a row slice for offset targets)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in names.items():
        key, offset = target if isinstance(target, tuple) else (target, None)
        shape = shapes[key]
        if len(shape) != 2:
            continue  # norms and conv embedders: erasure LoRAs patch Linear weights
        out = offset[2] if offset else shape[0]
        up, down = 0.05 * torch.randn(out, 2, generator=gen), torch.randn(2, shape[1], generator=gen)
        if style == "kohya":
            tensors.update(
                {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}
            )
        else:
            tensors.update({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down})
    save_file(tensors, str(path))
    return tensors


def run_node(pack, folder, model, file):
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(folder))
    return tuple(pack["lora"].EraserLoRALoad.execute(model, file, 1.0, "always").result)[0]


def test_every_comfyui_spelling_patches_the_same_weights_through_the_pack(comfy, pack, family, tmp_path):
    name, patcher, _ = family
    shapes = shapes_of(patcher)
    base = patched_weights(patcher)
    mine = pack["keys"].comfy_lora_names(shapes, name)
    # names where the pack deliberately differs from the host (see the table test) are checked there
    same = {
        n: t
        for n, t in host_table(comfy, patcher).items()
        if mine[n] == (t if not isinstance(t, tuple) else (t[0], t[1]))
    }
    classes = spellings(same)
    assert "lora_unet_" in classes and "diffusion_model." in classes
    for i, (cls, names) in enumerate(sorted(classes.items())):
        for style in ("kohya", "peft"):
            file = f"{name}-{cls.strip('._') or 'x'}-{style}.safetensors"
            lora = write_lora(tmp_path / file, names, shapes, style, seed=i)
            if not lora:
                continue
            theirs, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)
            ours = run_node(pack, tmp_path, patcher, file)
            assert sorted(ours.patches) == sorted(theirs.patches), (name, cls, style)
            assert_same_weights(patched_weights(ours), patched_weights(theirs), base)


def test_wan_fun_names_are_read_as_comfyui_reads_them(comfy, pack, tmp_path):
    patcher, _, _ = build(comfy, "wan")
    shapes = shapes_of(patcher)
    names = {
        f"lora_unet__blocks_{i}_cross_attn_{p}": f"blocks.{i}.cross_attn.{p}.weight" for i in range(2) for p in "kv"
    }
    lora = write_lora(tmp_path / "wan-fun.safetensors", names, shapes, "kohya", seed=3)
    theirs, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)
    ours = run_node(pack, tmp_path, patcher, "wan-fun.safetensors")
    assert sorted(ours.patches) == sorted(theirs.patches) == sorted(PREFIX + k for k in names.values())
    assert_same_weights(patched_weights(ours), patched_weights(theirs), patched_weights(patcher))


def test_names_comfyui_does_not_read_for_the_family_are_refused_by_name(comfy, pack, tmp_path):
    """diffusers' own Wan names (blocks.i.attn2.to_k) are not in ComfyUI's Wan table: refused, naming Wan and
    the keys, nothing patched."""
    patcher, _, _ = build(comfy, "wan")
    shapes = shapes_of(patcher)
    names = {f"transformer.blocks.{i}.attn2.to_k": f"blocks.{i}.cross_attn.k.weight" for i in range(2)}
    write_lora(tmp_path / "wan-diffusers.safetensors", names, shapes, "peft", seed=4)
    with pytest.raises(ValueError, match=r"Wan 2\.1/2\.2.*transformer\.blocks\.0\.attn2\.to_k"):
        run_node(pack, tmp_path, patcher, "wan-diffusers.safetensors")
    assert patcher.patches == {}


def test_unmatched_keys_are_listed_and_the_rest_applies(comfy, pack, tmp_path, caplog):
    patcher, _, _ = build(comfy, "qwen_image")
    shapes = shapes_of(patcher)
    names = {
        "transformer.txt_in": "txt_in.weight",
        "transformer.transformer_blocks.0.attn.add_k_proj": ("transformer_blocks.0.attn.add_k_proj.weight"),
    }
    lora = write_lora(tmp_path / "qwen.safetensors", names, shapes, "peft", seed=5)
    stray = {
        "transformer.transformer_blocks.7.attn.to_k.lora_A.weight": torch.zeros(2, 128),
        "transformer.transformer_blocks.7.attn.to_k.lora_B.weight": torch.zeros(128, 2),
    }
    save_file({**lora, **stray}, str(tmp_path / "qwen.safetensors"))
    with caplog.at_level(logging.WARNING):
        ours = run_node(pack, tmp_path, patcher, "qwen.safetensors")
    assert sorted(ours.patches) == sorted(PREFIX + k for k in names.values())
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"1 key\(s\) match no layer.*transformer\.transformer_blocks\.7\.attn\.to_k", warned)


def test_auraflow_lora_names_are_comfyuis_and_both_spellings_patch_as_comfyui_does(comfy, pack, tmp_path):
    """AuraFlow (Tier 2): the pack's name table equals ComfyUI's (generic spellings and diffusers'
    ``transformer.<name>``), and a LoRA on the text input in either spelling patches exactly what ComfyUI's
    own loader patches."""
    import comfy.model_base as mb

    if not hasattr(mb, "AuraFlow"):
        pytest.skip("this ComfyUI has no AuraFlow class")
    patcher, _, _ = build(comfy, "auraflow")
    shapes = shapes_of(patcher)
    mine, host = pack["keys"].comfy_lora_names(shapes, "auraflow"), host_table(comfy, patcher)
    assert mine == host, (sorted(set(mine) ^ set(host))[:6], [n for n in host if mine.get(n) != host[n]][:4])
    out_f, in_f = shapes["cond_seq_linear.weight"]
    gen = torch.Generator().manual_seed(3)
    up, down = torch.randn(out_f, 2, generator=gen) * 0.1, torch.randn(2, in_f, generator=gen) * 0.1
    base = patched_weights(patcher)
    for file, tensors in (
        (
            "aura.safetensors",
            {"lora_unet_cond_seq_linear.lora_up.weight": up, "lora_unet_cond_seq_linear.lora_down.weight": down},
        ),
        (
            "aura_diffusers.safetensors",
            {"transformer.context_embedder.lora_B.weight": up, "transformer.context_embedder.lora_A.weight": down},
        ),
    ):
        save_file(tensors, str(tmp_path / file))
        mine_m = run_node(pack, tmp_path, patcher, file)
        host_m, _ = comfy.sd.load_lora_for_models(patcher, None, tensors, 1.0, 0.0)
        assert_same_weights(patched_weights(mine_m), patched_weights(host_m), base, ["cond_seq_linear.weight"])
    assert patcher.patches == {}
