"""SDXL and SD3 against a real ComfyUI (opt-in: ``COMFYUI_PATH``): every suppression node on models built
from ComfyUI's own SDXL and SD3 classes (reduced, random weights; suppression_models.py), sampled a few
steps. Each node must reach its hook (attn2 dispatch, DiT joint blocks, the SLD extra pass, the SAFREE
conditioning swap) and leave the output bit-identical at strength 0. Unserved families are refused by name.
"""

from __future__ import annotations

import inspect
import logging
import os
import types

import pytest
import torch
from suppression_models import (  # noqa: F401  (comfy, pack, counts, sdxl, sd3 are fixtures)
    COMMON,
    PROMPT,
    SAFREE_ARGS,
    comfy,
    counts,
    makers,
    pack,
    run_node,
    sample,
    sd3,
    sdxl,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

#: node → the counter its hook increments (see the ``counts`` fixture)
HOOK = {"safree": "safree_swap", "sld": "sld_pass", "guidance": "nag", "tokens": "biased"}


def check_every_node(comfy, nodes, model, clip, counts, channels):
    base = sample(comfy, model, clip, PROMPT, channels=channels)
    assert torch.isfinite(base).all()
    for name, make in makers(nodes, model, clip).items():
        before = dict(counts)
        off = sample(comfy, make(0.0), clip, PROMPT, channels=channels)
        assert torch.equal(off, base), f"{name}: strength 0 must leave the output bit-identical"
        assert counts == before, f"{name}: at strength 0 no hook may run"
        on = sample(comfy, make(1.0), clip, PROMPT, channels=channels)
        assert torch.isfinite(on).all(), name
        assert counts[HOOK[name]] > before[HOOK[name]], f"{name}: its hook was never called"
        assert not torch.equal(on, base), f"{name} had no effect"


def test_sdxl_every_node_hooks_in_and_strength_zero_is_bit_identical(comfy, pack, sdxl, counts):
    nodes, hooks = pack
    model, clip = sdxl
    assert nodes.sc.model_family(model) == "sdxl"
    sites = hooks.unet_attn2_sites(model.model.diffusion_model.state_dict().keys())
    assert len(sites) == 7  # 2 input + 1 middle + 4 output cross-attention blocks of the reduced UNet
    m = makers(nodes, model, clip)["tokens"](1.0)
    replaced = m.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(replaced) == set(sites) and all(isinstance(p, hooks.Attn2Dispatch) for p in replaced.values())
    check_every_node(comfy, nodes, model, clip, counts, channels=4)


def test_sd3_every_node_hooks_in_and_strength_zero_is_bit_identical(comfy, pack, sd3, counts, monkeypatch):
    nodes, hooks = pack
    model, clip = sd3
    assert nodes.sc.model_family(model) == "sd3"
    seen = []
    original = hooks.DitDispatch.__call__

    def spy(self, args, extra):
        seen.append((self.kind, self.index))
        return original(self, args, extra)

    monkeypatch.setattr(hooks.DitDispatch, "__call__", spy)
    check_every_node(comfy, nodes, model, clip, counts, channels=16)
    assert {("double", 0), ("double", 1)} <= set(seen)  # both joint blocks went through the dispatcher


def test_unserved_families_are_refused_by_name(pack):
    nodes, _ = pack
    from concept_erasers_suppression_test.erasers.errors import UnsupportedFamily

    class StableCascadeLike:  # any model class the nodes do not know
        pass

    model = types.SimpleNamespace(model=StableCascadeLike())
    args = {"clip": None, **COMMON}
    calls = {
        nodes.EraserSAFREE: dict(
            prompt=PROMPT,
            concepts="nude",
            preset="nudity",
            alpha=0.01,
            include_eos=True,
            self_validating=False,
            keywords_as_negative=False,
        ),
        nodes.EraserSLD: dict(preset="medium", safety_concept="nude"),
        nodes.EraserConceptGuidance: dict(concepts="nude", phi=5.0, tau=2.5, alpha=0.25, sigma_end=0.0),
        nodes.EraserTokenSuppress: dict(concepts="nude", factor=0.0, include_eos=True, similarity=0.9, prompt=""),
    }
    for node, kw in calls.items():
        with pytest.raises(UnsupportedFamily, match="StableCascadeLike"):
            run_node(node, model=model, **args, **kw)


def test_safree_takes_an_empty_prompt_from_the_workflow_or_says_why_not(comfy, pack, sdxl, caplog):
    nodes, _ = pack
    model, clip = sdxl
    kw = dict(model=model, clip=clip, **SAFREE_ARGS, **COMMON)
    typed = sample(comfy, run_node(nodes.EraserSAFREE, prompt=PROMPT, **kw), clip, PROMPT)
    assert not torch.equal(typed, sample(comfy, model, clip, PROMPT))
    # the API-format workflow ComfyUI hands over as the hidden PROMPT input
    graph = {
        "1": {"class_type": "EraserSAFREE", "inputs": {"model": ["0", 0], "clip": ["0", 1], "prompt": ""}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["0", 1], "text": PROMPT}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0]}},
    }
    hidden = {"PROMPT": graph, "UNIQUE_ID": "1"}
    if "v3_data" in inspect.signature(nodes.EraserSAFREE.PREPARE_CLASS_CLONE).parameters:
        hidden = {"hidden_inputs": hidden}  # newer ComfyUI (0.2x) wraps the hidden inputs
    node = nodes.EraserSAFREE.PREPARE_CLASS_CLONE(hidden)
    assert torch.equal(sample(comfy, node.execute(prompt="", **kw).result[0], clip, PROMPT), typed)
    # no workflow to look in: fail closed — an error before sampling, not an unguarded image
    with pytest.raises(ValueError, match="could not be recovered .no sampler"):
        run_node(nodes.EraserSAFREE, prompt="", **kw)
    # only with the explicit pass-through toggle: the model goes through unerased, with a warning
    with caplog.at_level(logging.WARNING):
        m = run_node(nodes.EraserSAFREE, prompt="", allow_pass_through=True, **kw)
    assert "could not be recovered" in caplog.text and "passing the model through unerased" in caplog.text
    assert torch.equal(sample(comfy, m, clip, PROMPT), sample(comfy, model, clip, PROMPT))
    # a prompt typed into the node that is not the one the sampler encodes: refused before the first step
    other = run_node(nodes.EraserSAFREE, prompt="a quiet harbour at dawn", **kw)
    with pytest.raises(ValueError, match="not the encoding of the prompt this node analysed"):
        sample(comfy, other, clip, PROMPT)


def test_safree_svf_window_whole_projects_every_step_when_the_switch_is_on(comfy, pack, sdxl, counts, monkeypatch):
    """svf_window 'paper': the projection on the first (t′ + 1)/50 of the schedule; 'whole': t′ only switches it
    on or off, and when on every step samples with the projected conditioning (issue #14). The benign-leaning
    prompt gets t′ = 0 (switch off), the concept-only one t′ ≥ 1 (on): both branches are exercised."""
    nodes, _ = pack
    model, clip = sdxl
    # widget order as the frontend stores it (required, then optional): svf_window after every older widget,
    # and optional, so older UI workflows load unshifted and older API prompts validate (paper window)
    info = nodes.EraserSAFREE.INPUT_TYPES()
    assert list(info["required"])[-1] == "risk_gate"
    assert list(info["optional"]) == ["svf_window", "allow_pass_through"]
    assert info["optional"]["svf_window"][1]["default"] == "paper"
    seen = []
    analyse = nodes.safree.analyse

    def spy(config, *a, **k):
        result = analyse(config, *a, **k)
        seen.append((config.svf_window, result))
        return result

    monkeypatch.setattr(nodes.safree, "analyse", spy)
    steps, branches = 10, set()
    for prompt in (PROMPT, "nude naked nude"):
        seen.clear()
        swaps = {}
        for window in ("paper", "whole"):
            before = counts["safree_swap"]
            m = run_node(
                nodes.EraserSAFREE,
                model=model,
                clip=clip,
                prompt=prompt,
                **dict(SAFREE_ARGS, self_validating=True),
                svf_window=window,
                **COMMON,
            )
            sample(comfy, m, clip, prompt, steps=steps)
            swaps[window] = counts["safree_swap"] - before
        (w_paper, paper), (w_whole, whole) = seen
        assert (w_paper, w_whole) == ("paper", "whole")  # the widget reaches the core config
        assert paper.t_prime == whole.t_prime and bool(paper.flagged.any()), prompt
        if whole.t_prime >= 1:
            branches.add("on")
            assert whole.changed and whole.filter_fraction == 1.0
            assert swaps["whole"] == steps, (prompt, swaps)
            assert swaps["paper"] < swaps["whole"], (prompt, swaps)  # (t′ + 1)/50 ≤ 22 % of the schedule
        else:  # the switch is off: the prompt keeps its conditioning on every step
            branches.add("off")
            assert not whole.changed and swaps["whole"] == 0, (prompt, swaps)
    assert branches == {"on", "off"}, branches
