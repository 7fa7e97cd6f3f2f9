"""``python -m erasers_dev.family_workflows``: writes example_workflows/family_*.json, one per Tier-1 family.

Each is the family's own loaders (the model file names ComfyUI's templates use), an erase-then-guard chain
with what the family table serves (closed form at the family's text entry, then a guard), and the sampler
settings its model card recommends. The files are generated so that their node graphs stay consistent
(ids, links, slots); the server test validates every one against the real ComfyUI's /object_info
(tests/comfyui/test_example_workflows_run.py) — they cannot run there: no such weights exist offline.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

UCE_ART = ["uce", "Van Gogh", "", "Claude Monet", 1.0, "art", "", 0]
PROMPT = "a starry night over a village, painting by Van Gogh"
NEGATIVE = "blurry, low quality"
WINDOW = [1.0, 0.0, 1.0, 0.0]  # strength, start_percent, end_percent, risk_gate
GUARDS = {
    "token": ("EraserTokenSuppress", ["Van Gogh", 0.0, False, 0.9, PROMPT] + WINDOW),
    "guidance": ("EraserConceptGuidance", ["Van Gogh", 5.0, 2.5, 0.25, -1.0] + WINDOW),
    "sld": ("EraserSLD", ["medium", "Van Gogh"] + WINDOW),
    "safree": ("EraserSAFREE", [PROMPT, "Van Gogh", "nudity", 0.01, True, True, False] + WINDOW + ["whole"]),
}

#: family → (title, UNet file, CLIP loader (type, widgets), VAE file, latent node (type, widgets), guard, cfg, steps,
#: ComfyUI version that has every node and CLIP type the graph uses)
FAMILIES = {
    "chroma": (
        "Chroma: UCE at txt_in, then concept guidance (NAG through the host's blocks)",
        "chroma-unlocked-v48.safetensors",
        ("CLIPLoader", ["t5xxl_fp16.safetensors", "chroma", "default"]),
        "ae.safetensors",
        ("EmptySD3LatentImage", [1024, 1024, 1]),
        "guidance",
        4.0,
        26,
        "0.3.64",
    ),
    "flux2_klein": (
        "Flux.2 [klein]: UCE at txt_in (keys through txt_norm), then token suppression; cfg 1 (distilled)",
        "flux-2-klein-4b.safetensors",
        ("CLIPLoader", ["qwen_3_4b.safetensors", "flux2", "default"]),
        "flux2-vae.safetensors",
        ("EmptyFlux2LatentImage", [1024, 1024, 1]),
        "token",
        1.0,
        4,
        "0.29",
    ),
    "qwen_image": (
        "Qwen-Image: UCE at txt_in (keys through txt_norm, template head dropped as the host does), then SAFREE",
        "qwen_image_fp8_e4m3fn.safetensors",
        ("CLIPLoader", ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "default"]),
        "qwen_image_vae.safetensors",
        ("EmptySD3LatentImage", [1328, 1328, 1]),
        "safree",
        2.5,
        20,
        "0.29",
    ),
    "lumina2": (
        "Lumina 2: UCE at cap_embedder.1 (keys through its RMSNorm), then Safe Latent Diffusion",
        "lumina_2_model_bf16.safetensors",
        ("CLIPLoader", ["gemma_2_2b_fp16.safetensors", "lumina2", "default"]),
        "ae.safetensors",
        ("EmptySD3LatentImage", [1024, 1024, 1]),
        "sld",
        4.0,
        25,
        "0.3.64",
    ),
    "zimage_turbo": (
        "Z-Image Turbo: UCE at cap_embedder.1, then token suppression; cfg 1, 8 steps (distilled)",
        "z_image_turbo_bf16.safetensors",
        ("CLIPLoader", ["qwen_3_4b.safetensors", "lumina2", "default"]),
        "ae.safetensors",
        ("EmptySD3LatentImage", [1024, 1024, 1]),
        "token",
        1.0,
        8,
        "0.29",
    ),
    "wan21_t2v": (
        "Wan 2.1 text-to-video: UCE at every block's cross_attn.k/v (keys through text_embedding), then concept "
        "guidance on every frame; a 2-second clip (33 frames at 16 fps)",
        "wan2.1_t2v_1.3B_fp16.safetensors",
        ("CLIPLoader", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]),
        "wan_2.1_vae.safetensors",
        ("EmptyHunyuanLatentVideo", [832, 480, 33, 1]),
        "guidance",
        6.0,
        30,
        "0.3.64",
    ),
    "hidream": (
        "HiDream-I1: UCE at every caption projection (each with its own Llama layer's keys) and the pooled "
        "embedder, then Safe Latent Diffusion",
        "hidream_i1_full_fp16.safetensors",
        (
            "QuadrupleCLIPLoader",
            [
                "clip_l_hidream.safetensors",
                "clip_g_hidream.safetensors",
                "t5xxl_fp8_e4m3fn_scaled.safetensors",
                "llama_3.1_8b_instruct_fp8_scaled.safetensors",
            ],
        ),
        "ae.safetensors",
        ("EmptySD3LatentImage", [1024, 1024, 1]),
        "sld",
        5.0,
        50,
        "0.3.64",
    ),
}

OUTPUTS = {
    "UNETLoader": [("MODEL", "MODEL")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "QuadrupleCLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "EraserClosedForm": [("MODEL", "MODEL"), ("ERASER", "ERASER")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "EmptyFlux2LatentImage": [("LATENT", "LATENT")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    **{node: [("MODEL", "MODEL")] for node, _ in GUARDS.values()},
}


class Graph:
    """A ComfyUI UI-format workflow built node by node: ``add`` returns the node id; inputs name
    (node id, output slot)."""

    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, kind: str, widgets: list, inputs: dict = None, types: dict = None) -> int:
        node_id = len(self.nodes) + 1
        node_inputs = []
        for name, (src, slot) in (inputs or {}).items():
            link_id = len(self.links) + 1
            kind_of = OUTPUTS[self.nodes[src - 1]["type"]][slot][1]
            self.links.append([link_id, src, slot, node_id, len(node_inputs), kind_of])
            self.nodes[src - 1]["outputs"][slot]["links"].append(link_id)
            node_inputs.append({"name": name, "type": kind_of, "link": link_id})
        column = len(self.nodes)
        self.nodes.append(
            {
                "id": node_id,
                "type": kind,
                "pos": [380 * (column // 3), 220 * (column % 3)],
                "size": [320, 180],
                "flags": {},
                "order": node_id - 1,
                "mode": 0,
                "inputs": node_inputs,
                "outputs": [
                    {"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(OUTPUTS[kind])
                ],
                "properties": {"Node name for S&R": kind},
                "widgets_values": widgets,
            }
        )
        return node_id

    def workflow(self, title: str, requires: str) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"concept_erasers": {"title": title, "requires_comfyui": requires}},
            "version": 0.4,
        }


def family_workflow(name: str) -> dict:
    title, unet, (clip_loader, clip_widgets), vae, (latent, latent_widgets), guard, cfg, steps, requires = FAMILIES[
        name
    ]
    g = Graph()
    model = g.add("UNETLoader", [unet, "default"])
    clip = g.add(clip_loader, clip_widgets)
    vae_id = g.add("VAELoader", [vae])
    erased = g.add("EraserClosedForm", list(UCE_ART), {"model": (model, 0), "clip": (clip, 0)})
    guard_node, guard_widgets = GUARDS[guard]
    guarded = g.add(guard_node, list(guard_widgets), {"model": (erased, 0), "clip": (clip, 0)})
    positive = g.add("CLIPTextEncode", [PROMPT], {"clip": (clip, 0)})
    negative = g.add("CLIPTextEncode", [NEGATIVE if cfg > 1 else ""], {"clip": (clip, 0)})
    empty = g.add(latent, list(latent_widgets))
    sampled = g.add(
        "KSampler",
        [42, "fixed", steps, cfg, "euler", "simple", 1.0],
        {"model": (guarded, 0), "positive": (positive, 0), "negative": (negative, 0), "latent_image": (empty, 0)},
    )
    image = g.add("VAEDecode", [], {"samples": (sampled, 0), "vae": (vae_id, 0)})
    g.add("SaveImage", [f"erased/{name}"], {"images": (image, 0)})
    return g.workflow(title, requires)


def main() -> None:
    for name in FAMILIES:
        path = OUT / f"family_{name}.json"
        path.write_text(json.dumps(family_workflow(name), indent=1) + "\n", encoding="utf-8")
        print(path.relative_to(OUT.parent))


if __name__ == "__main__":
    main()
