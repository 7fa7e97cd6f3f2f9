"""UI-format workflows (what the frontend saves, and what ``example_workflows/`` holds) → API format.

The server only runs API-format graphs. A UI node stores its widget values *positionally* in
``widgets_values``; the names come from ``/object_info``'s ``input_order`` (required, then optional),
where every input of a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO) takes one slot, plus one extra
slot after an INT with ``control_after_generate`` (or named ``seed`` / ``noise_seed`` when that option is
absent) and two after a COMBO with ``control_after_generate`` (the frontend's rules, frontend 1.27).
Bypassed nodes (mode 4) are removed and their consumers rewired to the input of the same type; muted
nodes (mode 2) and frontend-only nodes (notes) are dropped. Also checks the workflow against
``/object_info`` (types, combo options, number ranges, link types).
"""

from __future__ import annotations

from typing import Optional

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
MODE_NEVER, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """A UI workflow that does not match the server's node definitions."""


def _spec_type(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def _spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec) -> Optional[list]:
    if isinstance(spec[0], list):
        return spec[0]
    return _spec_options(spec).get("options")


def is_widget(spec) -> bool:
    return _spec_type(spec) in WIDGET_TYPES and not _spec_options(spec).get("forceInput")


def widget_slots(name: str, spec) -> int:
    """How many ``widgets_values`` entries this input occupies in the UI format."""
    kind, opts = _spec_type(spec), _spec_options(spec)
    if kind == "INT":
        control = opts.get("control_after_generate")
        if control is None:
            control = name in ("seed", "noise_seed")
        return 2 if control else 1
    if kind == "COMBO" and opts.get("control_after_generate"):
        return 3
    return 1


def ordered_inputs(info: dict) -> list:
    """``[(name, spec, required)]`` in the order the frontend creates widgets."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {sec: list(inputs.get(sec, {})) for sec in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is not None:
                out.append((name, spec, section == "required"))
    return out


def widget_values(node: dict, info: dict) -> dict:
    """Named widget values of a UI node (dict-form ``widgets_values`` is accepted as well)."""
    raw = node.get("widgets_values")
    if isinstance(raw, dict):
        return dict(raw)
    raw = list(raw or [])
    values, pos = {}, 0
    for name, spec, _ in ordered_inputs(info):
        if not is_widget(spec):
            continue
        if pos >= len(raw):
            break
        values[name] = raw[pos]
        pos += widget_slots(name, spec)
    return values


def _links_by_id(workflow: dict) -> dict:
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type"),
            )
        else:
            link_id, origin, origin_slot, target, target_slot, kind = link[:6]
            out[link_id] = (origin, origin_slot, target, target_slot, kind)
    return out


def validate(workflow: dict, object_info: dict) -> list:
    """Problems of a UI workflow against ``/object_info`` (empty list = valid)."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links_by_id(workflow)
    for node in nodes.values():
        kind = node.get("type")
        if kind in FRONTEND_ONLY:
            continue
        info = object_info.get(kind)
        if info is None:
            problems.append(f"node {node['id']}: unknown node type '{kind}' (missing node)")
            continue
        values = widget_values(node, info)
        linked = {i.get("name") for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec, required in ordered_inputs(info):
            if name in linked:
                continue
            if not is_widget(spec):
                if required:
                    problems.append(f"node {node['id']} ({kind}): required input '{name}' is not connected")
                continue
            if name not in values:
                if required:
                    problems.append(f"node {node['id']} ({kind}): no value for widget '{name}'")
                continue
            value, opts, t = values[name], _spec_options(spec), _spec_type(spec)
            if t == "COMBO":
                options = combo_values(spec) or []
                if value not in options:
                    problems.append(f"node {node['id']} ({kind}): '{name}' = {value!r} is not one of {options[:8]}")
            elif t in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"node {node['id']} ({kind}): '{name}' = {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(
                        f"node {node['id']} ({kind}): '{name}' = {value} outside [{opts.get('min')}, {opts.get('max')}]"  # noqa: E501
                    )
            elif t == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {node['id']} ({kind}): '{name}' = {value!r} is not a boolean")
            elif t == "STRING" and not isinstance(value, str):
                problems.append(f"node {node['id']} ({kind}): '{name}' = {value!r} is not a string")
    for link_id, (origin, origin_slot, target, target_slot, kind) in links.items():
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id}: joins a node that does not exist")
            continue
        src = object_info.get(nodes[origin].get("type"))
        if src is not None:
            outputs = src.get("output", [])
            if origin_slot >= len(outputs):
                problems.append(f"link {link_id}: node {origin} has no output {origin_slot}")
            elif kind not in (None, "*") and outputs[origin_slot] != kind and outputs[origin_slot] != "*":
                problems.append(
                    f"link {link_id}: carries {kind} but output {origin_slot} of node {origin} is {outputs[origin_slot]}"  # noqa: E501
                )
    return problems


def to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt of a UI workflow (bypassed and muted nodes resolved the way the frontend does)."""
    problems = validate(workflow, object_info)
    if problems:
        raise WorkflowError("workflow does not match /object_info:\n  " + "\n  ".join(problems))
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links_by_id(workflow)

    def source(link_id, depth=0):
        """(origin node id, slot) feeding a link, looking through bypassed nodes; None if muted away."""
        origin, slot, _, _, kind = links[link_id]
        node = nodes[origin]
        mode = node.get("mode", 0)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS and depth < 64:
            # the frontend passes the first input of the output's type straight through
            for inp in node.get("inputs", []):
                if inp.get("type") == kind and inp.get("link") is not None:
                    return source(inp["link"], depth + 1)
            return None
        return str(origin), slot

    prompt = {}
    for node in nodes.values():
        kind = node.get("type")
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[kind]
        inputs = widget_values(node, info)
        inputs = {k: v for k, v in inputs.items() if k in {n for n, _, _ in ordered_inputs(info)}}
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is None:
                inputs.pop(inp["name"], None)
            else:
                inputs[inp["name"]] = [src[0], src[1]]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title") or kind}}
    return prompt
