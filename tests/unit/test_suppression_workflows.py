import json
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
IDS = {"EraserSAFREE", "EraserSLD", "EraserConceptGuidance", "EraserTokenSuppress"}
#: widget count per node (inputs that are not MODEL/CLIP sockets), in schema order
WIDGETS = {"EraserSAFREE": 11, "EraserSLD": 6, "EraserConceptGuidance": 9, "EraserTokenSuppress": 9}


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
