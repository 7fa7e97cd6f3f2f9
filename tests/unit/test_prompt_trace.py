"""Recovering the positive prompt text from an API-format workflow (SAFREE's fallback when its prompt is empty)."""

from pack_import import pack_module as load

trace = load("nodes.prompt_trace")


def graph(text_value="a nude person", positive=("6", 0)):
    """Checkpoint → SAFREE (10) → LoRA (11) → KSampler (3), positive from CLIPTextEncode (6)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "10": {"class_type": "EraserSAFREE", "inputs": {"model": ["4", 0], "clip": ["4", 1], "prompt": ""}},
        "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0], "strength_model": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": text_value}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "3": {
            "class_type": "KSampler",
            "inputs": {"model": ["11", 0], "positive": list(positive), "negative": ["7", 0], "seed": 1},
        },
    }


def test_text_found_through_model_patches_and_not_the_negative():
    assert trace.positive_prompt_texts(graph(), "10") == ["a nude person"]
    assert trace.positive_prompt_texts(graph(), 10) == ["a nude person"]  # ids may arrive as ints


def test_text_through_conditioning_nodes_and_a_linked_string_node():
    g = graph(text_value=["20", 0], positive=("21", 0))
    g["20"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "linked text"}}
    g["21"] = {
        "class_type": "ConditioningSetTimestepRange",
        "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 1.0},
    }
    assert trace.positive_prompt_texts(g, "10") == ["linked text"]


def test_guider_ambiguity_and_unreadable_texts_are_reported():
    g = graph()
    del g["3"]
    g["30"] = {"class_type": "CFGGuider", "inputs": {"model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0]}}
    assert trace.positive_prompt_texts(g, "10") == ["a nude person"]
    g["31"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "another"}}
    g["32"] = {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["31", 0]}}
    assert sorted(trace.positive_prompt_texts(g, "10")) == ["a nude person", "another"]
    g2 = graph(text_value=["40", 0])
    g2["40"] = {"class_type": "SomeLLMPromptNode", "inputs": {"seed": 3}}
    assert trace.positive_prompt_texts(g2, "10") == [None]  # found, but not readable


def test_nothing_to_find():
    assert trace.positive_prompt_texts(None, "10") == []
    assert trace.positive_prompt_texts(graph(), None) == []
    g = graph()
    del g["3"]
    assert trace.positive_prompt_texts(g, "10") == []
    assert trace.positive_prompt_texts(graph(), "6") == []  # a node no MODEL flows from
