"""Load SPM Membrane: a membrane whose strength follows facilitated transport, applied per batch item."""

from comfy_api.latest import io

from ..erasers.membranes.formats.spm import concepts_from_metadata
from ..erasers.membranes.spm import COMBINATIONS, GATE_ALWAYS, GATE_FT, Gate, Membrane
from . import spm_runtime
from .fail_closed import rerun_every_queue
from .lora import ADAPTER_FOLDERS, adapter_files, full_path


class EraserSPMLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserSPMLoad",
            display_name="Load SPM Membrane",
            category="concept_erasers/adapters",
            description="Applies an SPM membrane with facilitated transport: it opens for prompts near its "
            "concepts and stays nearly shut for others. Chain several; they combine as selected.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model (scores each prompt)."),
                io.Combo.Input(
                    "membrane", options=adapter_files(), tooltip=f"From models/{', '.join(ADAPTER_FOLDERS)}"
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Scales the adapter: 0 = the original model, 1 = as trained.",
                ),
                io.Boolean.Input(
                    "transport", default=True, tooltip="Facilitated transport on/off (off: a plain LoRA)."
                ),
                io.Combo.Input(
                    "combination",
                    options=list(COMBINATIONS),
                    default="official",
                    tooltip="official: factors scaled by m and summed (m², cross terms, like the "
                    "reference); linear: each membrane at m independently.",
                ),
                io.String.Input(
                    "concepts",
                    default="",
                    optional=True,
                    tooltip="Only for files without 'prompts' metadata: comma-separated concepts.",
                ),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, transport=True, **inputs):
        # the gate recognises prompts by the texts in the workflow graph, which ComfyUI's cache key does not see
        return rerun_every_queue(cls) if transport else None

    @classmethod
    def execute(cls, model, clip, membrane, strength, transport, combination, concepts="") -> io.NodeOutput:
        path = full_path(membrane)
        deltas, report = spm_runtime.convert_for_model(model, path, fmt="spm")
        if strength == 0:
            return io.NodeOutput(model)
        names = concepts_from_metadata(report.metadata) or [c.strip() for c in concepts.split(",") if c.strip()]
        if transport and not names:
            raise ValueError(
                f"{membrane}: facilitated transport opens the membrane for its concepts, but the file has no "
                "'prompts' metadata and the node's 'concepts' input is empty. Type the concepts the membrane "
                "erases (comma-separated), or turn transport off."
            )
        gate = Gate(GATE_FT if transport else GATE_ALWAYS, names)
        m = model.clone()
        mem = Membrane(deltas, gate, float(strength), name=membrane)
        encoder = spm_runtime.ComfyTextEncoder(clip) if transport else None
        spm_runtime.attach(m, mem, encoder, spm_runtime.prompt_texts(cls.hidden.prompt), combination)
        return io.NodeOutput(m)


NODES = [EraserSPMLoad]
