"""Load Erasure LoRA: kohya / PEFT / EraseAnything / UCE / ESD files, always on or gated by transport."""
from comfy_api.latest import io

from . import spm_runtime

try:
    from ..erasers.lowrank import LowRankDelta
    from ..erasers.spm import GATE_FT, GATE_MODES, Gate, Membrane
except ImportError:
    from erasers.lowrank import LowRankDelta
    from erasers.spm import GATE_FT, GATE_MODES, Gate, Membrane

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


def static_patches(deltas) -> dict:
    """LayerDeltas → add_patches values (LoRA adapters for factors, "diff" for dense); text keys skipped."""
    from comfy.weight_adapter import LoRAAdapter

    patches = {}
    for key, delta in deltas.items():
        name, offset = (key if isinstance(key, tuple) else (key, None))
        if name.startswith("te."):
            continue
        full = "diffusion_model." + name
        value = LoRAAdapter(set(), (delta.up, delta.down, None, None, None, None)) \
            if isinstance(delta, LowRankDelta) else ("diff", (delta,))
        patches[full if offset is None else (full, offset)] = value
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
                io.Combo.Input("file", options=adapter_files(), tooltip="Erasure LoRA or weight file from models/erasers, models/spm or models/loras."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip="Scales the adapter: 0 = the original model, 1 = as trained."),
                io.Combo.Input("gate", options=list(GATE_MODES), default=GATE_MODES[0], tooltip="always: a plain LoRA; facilitated transport: opens only for prompts near its concepts (needs CLIP)."),
                io.Clip.Input("clip", optional=True, tooltip="Needed by the facilitated-transport gate."),
                io.String.Input("concepts", default="", optional=True,
                                tooltip="Concepts the gate opens for, comma-separated (default: the file's metadata)."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, file, strength, gate, clip=None, concepts="") -> io.NodeOutput:
        deltas, report = spm_runtime.convert_for_model(model, full_path(file))
        if strength == 0:
            return io.NodeOutput(model)
        m = model.clone()
        if gate != GATE_FT:
            m.add_patches(static_patches(deltas), float(strength))
            return io.NodeOutput(m)
        if clip is None:
            raise ValueError("The 'facilitated transport' gate scores each prompt with the text encoder: connect CLIP.")
        names = [c.strip() for c in concepts.split(",") if c.strip()] or report.concepts or \
            [c.strip() for c in report.metadata.get("prompts", "").split(",") if c.strip()]
        mem = Membrane(deltas, Gate(GATE_FT, names), float(strength), name=file)
        spm_runtime.attach(m, mem, spm_runtime.ComfyTextEncoder(clip), spm_runtime.prompt_texts(cls.hidden.prompt),
                           None)
        return io.NodeOutput(m)


NODES = [EraserLoRALoad]
