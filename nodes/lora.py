"""Load Erasure LoRA: kohya / PEFT / EraseAnything / UCE / ESD files, always on or gated by transport."""

import logging

from comfy_api.latest import io

from ..erasers.lowrank import LowRankDelta
from ..erasers.membranes.formats._common import TEXT_PREFIX
from ..erasers.membranes.spm import GATE_FT, GATE_MODES, Gate, Membrane
from . import spm_runtime
from .fail_closed import cannot, pass_through_input, rerun_every_queue

log = logging.getLogger(__name__)
ADAPTER_FOLDERS = ("erasers", "spm", "loras")


def adapter_files() -> list:
    import folder_paths

    names = []
    for folder in ADAPTER_FOLDERS:
        try:
            names.extend(n for n in folder_paths.get_filename_list(folder) if n.endswith(".safetensors"))
        except KeyError:
            continue
    return sorted(dict.fromkeys(names))


def full_path(name: str) -> str:
    import folder_paths

    for folder in ADAPTER_FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    raise FileNotFoundError(f"'{name}' is in none of models/{', models/'.join(ADAPTER_FOLDERS)}.")


def _lora_patch(delta):
    from comfy.weight_adapter import LoRAAdapter

    return (
        LoRAAdapter(set(), (delta.up, delta.down, None, None, None, None))
        if isinstance(delta, LowRankDelta)
        else ("diff", (delta,))
    )


def static_patches(deltas) -> dict:
    """LayerDeltas → add_patches values for the diffusion model (LoRA adapters for factors, "diff" for
    dense); text keys are left to ``text_patches``."""
    patches = {}
    for key, delta in deltas.items():
        name, offset = key if isinstance(key, tuple) else (key, None)
        if name.startswith(TEXT_PREFIX):
            continue
        full = "diffusion_model." + name
        patches[full if offset is None else (full, offset)] = _lora_patch(delta)
    return patches


def text_patches(deltas) -> dict:
    """The text-encoder part of LayerDeltas as add_patches values keyed by the CLIP's state-dict names."""
    patches = {}
    for key, delta in deltas.items():
        if isinstance(key, str) and key.startswith(TEXT_PREFIX):
            encoder, path = key[len(TEXT_PREFIX) :].split(".", 1)
            patches[f"{encoder}.transformer.{path}"] = _lora_patch(delta)
    return patches


class EraserLoRALoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserLoRALoad",
            display_name="Load Erasure LoRA",
            category="concept_erasers/adapters",
            description="Applies an erasure LoRA or weight file (kohya, diffusers/PEFT, EraseAnything Flux, UCE, "
            "ESD). Gate 'facilitated transport' keeps it shut for prompts unrelated to its concepts.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Combo.Input(
                    "file",
                    options=adapter_files(),
                    tooltip="Erasure LoRA or weight file from models/erasers, models/spm or models/loras.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Scales the adapter: 0 = the original model, 1 = as trained.",
                ),
                io.Combo.Input(
                    "gate",
                    options=list(GATE_MODES),
                    default=GATE_MODES[0],
                    tooltip="always: a plain LoRA; facilitated transport: opens only for prompts near its concepts "
                    "(needs CLIP).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Text encoder: scores prompts for the facilitated-transport gate; with gate "
                    "'always' it also receives the file's text-encoder keys (lora_te…).",
                ),
                io.String.Input(
                    "concepts",
                    default="",
                    optional=True,
                    tooltip="Concepts the gate opens for, comma-separated (default: the file's metadata).",
                ),
                pass_through_input(),
            ],
            outputs=[
                io.Model.Output(),
                io.Clip.Output(
                    tooltip="The CLIP with the file's text-encoder keys applied (gate 'always'); unchanged otherwise."
                ),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, gate=GATE_MODES[0], **inputs):
        # the gate recognises prompts by the texts in the workflow graph, which ComfyUI's cache key does not see
        return rerun_every_queue(cls) if gate == GATE_FT else None

    @classmethod
    def execute(cls, model, file, strength, gate, clip=None, concepts="", allow_pass_through=False) -> io.NodeOutput:
        deltas, report = spm_runtime.convert_for_model(model, full_path(file), clip=clip)
        if strength == 0:
            return io.NodeOutput(model, clip)
        m = model.clone()
        unet = {k: d for k, d in deltas.items() if not (isinstance(k, str) and k.startswith(TEXT_PREFIX))}
        text = text_patches(deltas)
        out_clip = clip
        uid = getattr(getattr(cls, "hidden", None), "unique_id", None)
        if text and clip is None:
            cannot(
                "Load Erasure LoRA",
                f"{file} also edits {len(text)} text-encoder layer(s) (lora_te…), but no CLIP is connected, so "
                "that half of the erasure would be lost. Connect the CLIP and use the node's CLIP output.",
                allow_pass_through,
                uid,
            )
        elif text and gate != GATE_FT:
            out_clip = clip.clone()
            out_clip.add_patches(text, float(strength))
        elif text:
            cannot(
                "Load Erasure LoRA",
                f"{file} edits {len(text)} text-encoder layer(s), which the facilitated-transport gate cannot "
                "apply (it gates the diffusion model only). Use gate 'always' for this file.",
                allow_pass_through,
                uid,
            )
        if not unet:
            return io.NodeOutput(m, out_clip)
        if gate != GATE_FT:
            m.add_patches(static_patches(unet), float(strength))
            return io.NodeOutput(m, out_clip)
        if clip is None:
            raise ValueError(
                "The 'facilitated transport' gate scores each prompt with the text encoder: connect CLIP."
            )
        names = (
            [c.strip() for c in concepts.split(",") if c.strip()]
            or report.concepts
            or [c.strip() for c in report.metadata.get("prompts", "").split(",") if c.strip()]
        )
        if not names:
            raise ValueError(
                f"{file}: the facilitated-transport gate opens for the file's concepts, but it names none in its "
                "metadata and the node's 'concepts' input is empty. Type the concepts it erases, or use gate "
                "'always'."
            )
        mem = Membrane(unet, Gate(GATE_FT, names), float(strength), name=file)
        spm_runtime.attach(
            m, mem, spm_runtime.ComfyTextEncoder(clip), spm_runtime.prompt_texts(cls.hidden.prompt), None
        )
        return io.NodeOutput(m, out_clip)


NODES = [EraserLoRALoad]
