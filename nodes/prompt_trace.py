"""Recover the positive prompt text for a node from the workflow ComfyUI is running (API format).

CONDITIONING carries no text, yet SAFREE's masked-prompt test must re-encode the prompt with one token
masked at a time. When the user leaves the node's prompt empty, the node looks in the running workflow
(ComfyUI's hidden PROMPT input: ``{node_id: {"class_type": …, "inputs": {name: value | [src_id, slot]}}}``)
for the samplers that use its MODEL output and the text encoders behind their positive conditioning.
Pure dict processing: no ComfyUI import, so unit tests drive it with hand-made graphs.
"""

from __future__ import annotations

#: inputs through which a MODEL flows from one node to the next (loaders, patches, guiders, samplers)
MODEL_INPUTS = ("model",)
#: inputs that carry the positive conditioning into a sampler or guider
POSITIVE_INPUTS = ("positive", "conditioning")
#: text inputs of ComfyUI's text-encode nodes, in order of preference
TEXT_INPUTS = ("text", "t5xxl", "text_g", "clip_l", "text_l", "clip_g")
#: string inputs of primitive / string nodes a text widget may be linked to
STRING_INPUTS = ("value", "string", "text")
MAX_DEPTH = 32


def _link(value):
    """(source node id, output slot) if the input value is a link, else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0]), value[1]
    return None


def _string(graph: dict, value, depth: int = 0):
    """A literal string, or the string a linked primitive/string node holds (None if not recoverable)."""
    if isinstance(value, str):
        return value
    link = _link(value)
    if link is None or depth > MAX_DEPTH or link[0] not in graph:
        return None
    inputs = graph[link[0]].get("inputs", {})
    for name in STRING_INPUTS:
        if name in inputs:
            return _string(graph, inputs[name], depth + 1)
    return None


def _model_consumers(graph: dict, node_id: str) -> list:
    """Ids of the nodes downstream of ``node_id`` along MODEL inputs (breadth first)."""
    chain, queue, out = {str(node_id)}, [str(node_id)], []
    while queue:
        current = queue.pop(0)
        for nid, node in graph.items():
            if nid in chain:
                continue
            for name in MODEL_INPUTS:
                link = _link(node.get("inputs", {}).get(name))
                if link and link[0] == current:
                    chain.add(nid)
                    queue.append(nid)
                    out.append(nid)
    return out


def _texts_behind(graph: dict, value, seen: set, depth: int = 0) -> list:
    """Texts of the text-encode nodes a conditioning link comes from (through combine/range/guidance nodes)."""
    link = _link(value)
    if link is None or depth > MAX_DEPTH or link[0] in seen or link[0] not in graph:
        return []
    seen.add(link[0])
    node = graph[link[0]]
    inputs = node.get("inputs", {})
    if str(node.get("class_type", "")).startswith("CLIPTextEncode"):
        for name in TEXT_INPUTS:
            if name in inputs:
                text = _string(graph, inputs[name])
                return [text] if text is not None else [None]
        return [None]
    texts = []
    for name, v in inputs.items():
        if name not in ("clip", "model", "vae") and _link(v):
            texts += _texts_behind(graph, v, seen, depth + 1)
    return texts


def positive_prompt_texts(graph, node_id) -> list:
    """Distinct positive prompt texts of the samplers fed (directly or through patches) by ``node_id``'s
    MODEL; ``None`` in the list marks a text that could not be recovered (e.g. built by another node)."""
    if not isinstance(graph, dict) or node_id is None:
        return []
    found = []
    for nid in _model_consumers(graph, node_id):
        inputs = graph[nid].get("inputs", {})
        for name in POSITIVE_INPUTS:
            if name in inputs:
                for text in _texts_behind(graph, inputs[name], set()):
                    if text not in found:
                        found.append(text)
                break
    return found
