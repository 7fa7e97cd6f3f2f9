import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
IDS = {"EraserSAFREE", "EraserSLD", "EraserConceptGuidance", "EraserTokenSuppress"}
#: widget count per node (inputs that are not MODEL/CLIP sockets), in schema order
WIDGETS = {"EraserSAFREE": 12, "EraserSLD": 6, "EraserConceptGuidance": 9, "EraserTokenSuppress": 9}


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.name.startswith(("sd15_", "flux_"))], ids=lambda p: p.name)
def test_example_workflow_is_a_consistent_ui_graph(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    ours = [n for n in nodes.values() if n["type"] in IDS]
    assert len(ours) == 1
    assert len(ours[0]["widgets_values"]) == WIDGETS[ours[0]["type"]]
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind
    assert all(i["link"] is not None for n in nodes.values() for i in n["inputs"])


#: the SAFREE node's widgets in schema order (svf_window last: older saved workflows keep their values in place)
SAFREE_WIDGETS = (
    "prompt",
    "concepts",
    "preset",
    "alpha",
    "include_eos",
    "self_validating",
    "keywords_as_negative",
    "strength",
    "start_percent",
    "end_percent",
    "risk_gate",
    "svf_window",
)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_safree_examples_use_the_recommended_window(path):
    """Issue #14: examples use the measured strong setting (svf_window 'whole' with self-validation on)."""
    nodes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "EraserSAFREE"]
    for node in nodes:
        assert len(node["widgets_values"]) == len(SAFREE_WIDGETS)
        values = dict(zip(SAFREE_WIDGETS, node["widgets_values"]))
        assert values["svf_window"] == "whole", path.name
        assert values["self_validating"] is True, path.name  # 'whole' keeps t′ as the switch only with SVF on
        assert isinstance(values["keywords_as_negative"], bool) and isinstance(values["risk_gate"], float)
