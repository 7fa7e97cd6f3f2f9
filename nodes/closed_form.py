"""Closed-form erasure nodes (V3): compute, save, load and apply erasers on a cloned MODEL.

Every node validates first, then returns ``model.clone()`` with "diff" patches (``adapters.apply_eraser``);
the host's weights are never written, so bypassing a node or strength 0 gives the original model back.
"""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..erasers.config import EraserConfig
from ..erasers.edits.methods import METHODS
from ..erasers.errors import EraserError
from ..erasers.files.eraser_file import load_eraser, save_eraser
from . import adapters, folders

log = logging.getLogger(__name__)

CATEGORY = "concept_erasers"
ERASER = io.Custom("ERASER")
STRENGTH_TIP = (
    "Scales the edit: 0 = the original model (no patch), 1 = the solved edit, up to 2 to "
    "exaggerate it. Linear, and stacks with LoRAs."
)


def strength_input(default: float = 1.0):
    return io.Float.Input("strength", default=default, min=0.0, max=2.0, step=0.05, tooltip=STRENGTH_TIP)


def erasers_folder() -> str:
    if "erasers" not in folder_paths.folder_names_and_paths:
        folders.register_model_folders(folder_paths)
    return folder_paths.get_folder_paths("erasers")[0]


def progress_bar(total: int):
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(total, 1))
    return lambda done, count: bar.update_absolute(done, count)


class EraserClosedForm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserClosedForm",
            display_name="Erase Concepts (Closed Form)",
            category=CATEGORY,
            description="Removes concepts from the model by a closed-form edit of its text projections "
            "(UCE and related methods). Outputs a patched clone and the eraser for saving.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to edit (it is cloned, never modified)."),
                io.Clip.Input(
                    "clip", tooltip="The text encoder loaded with this model; concepts are encoded with it."
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="uce",
                    tooltip="Closed-form method: " + "; ".join(f"{k} = {m.title}" for k, m in METHODS.items()),
                ),
                io.String.Input(
                    "concepts",
                    multiline=True,
                    default="",
                    tooltip="Concepts to erase, one per line (commas separate too; quote a line to keep its commas).",
                ),
                io.String.Input(
                    "anchors",
                    multiline=True,
                    default="",
                    tooltip="What each concept should become: one for all or one per concept line. "
                    "Empty = the method's default for the concept type.",
                ),
                io.String.Input(
                    "preserve", multiline=True, default="", tooltip="Concepts that must stay unchanged, one per line."
                ),
                strength_input(),
                io.Combo.Input(
                    "concept_type",
                    options=list(EraserConfig.CONCEPT_TYPES),
                    default="object",
                    optional=True,
                    tooltip="Advanced: picks the published defaults (object/person, art style, nudity).",
                ),
                io.String.Input(
                    "params",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="Advanced: method parameters as JSON or name=value pairs, e.g. "
                    "lam=0.5, variant=2023. Unknown names are refused.",
                ),
                io.Int.Input(
                    "rank_cap",
                    default=0,
                    min=0,
                    max=4096,
                    optional=True,
                    tooltip="Advanced: keep at most this rank per layer (truncated SVD, smaller files). 0 = exact.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the concepts erased."),
                ERASER.Output(tooltip="The eraser, for Save Eraser or Apply Eraser."),
            ],
        )

    @classmethod
    def execute(
        cls, model, clip, method, concepts, anchors, preserve, strength, concept_type="object", params="", rank_cap=0
    ) -> io.NodeOutput:
        config = adapters.build_config(method, concepts, anchors, preserve, concept_type, params, rank_cap)
        eraser = adapters.compute_on_model(model, clip, config, progress=progress_bar(len(config.concepts)))
        return io.NodeOutput(adapters.apply_eraser(model, eraser, strength), eraser)


class EraserSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserSave",
            display_name="Save Eraser",
            category=CATEGORY,
            description="Writes the eraser as a small .safetensors file (kohya LoRA layout) into models/erasers.",
            inputs=[
                ERASER.Input("eraser", tooltip="An eraser from Erase Concepts or Load Eraser."),
                io.String.Input(
                    "filename",
                    default="eraser",
                    tooltip="File name inside models/erasers (no folders); .safetensors is added.",
                ),
                io.Boolean.Input(
                    "exact",
                    default=False,
                    optional=True,
                    tooltip="Full-rank edits (RECE, MACE) are written as truncated SVDs within 0.1% "
                    "relative error per layer (the error is stored in the file). On: "
                    "write them exactly (dense, larger). Low-rank edits are always exact.",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    optional=True,
                    tooltip="Off: an existing file of that name is an error and is left as it is. On: replace it.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, eraser, filename, exact=False, overwrite=False) -> io.NodeOutput:
        name = (filename or "").strip()
        if not name or "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
            raise EraserError(
                f"Expected a plain file name for the eraser, found '{filename}'. Use a name "
                f"without folders or '..' (it is saved in models/erasers)."
            )
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        path = save_eraser(eraser, os.path.join(erasers_folder(), name), exact=bool(exact), overwrite=bool(overwrite))
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


class EraserLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserLoad",
            display_name="Load Eraser",
            category=CATEGORY,
            description="Loads an eraser file from models/erasers and applies it to the model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the eraser to (it is cloned)."),
                io.Combo.Input(
                    "eraser_name",
                    options=folder_paths.get_filename_list("erasers")
                    if "erasers" in folder_paths.folder_names_and_paths
                    else [],
                    tooltip="An eraser file in models/erasers (made by Save Eraser or the CLI).",
                ),
                strength_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the eraser applied."),
                ERASER.Output(tooltip="The loaded eraser."),
            ],
        )

    @classmethod
    def execute(cls, model, eraser_name, strength) -> io.NodeOutput:
        erasers_folder()
        eraser = load_eraser(folder_paths.get_full_path_or_raise("erasers", eraser_name))
        return io.NodeOutput(adapters.apply_eraser(model, eraser, strength), eraser)


class EraserApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserApply",
            display_name="Apply Eraser",
            category=CATEGORY,
            description="Applies an eraser to a model (e.g. one computed on another branch of the graph).",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the eraser to (it is cloned)."),
                ERASER.Input("eraser", tooltip="An eraser from Erase Concepts or Load Eraser."),
                strength_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with the eraser applied.")],
        )

    @classmethod
    def execute(cls, model, eraser, strength) -> io.NodeOutput:
        return io.NodeOutput(adapters.apply_eraser(model, eraser, strength))


NODES = [EraserClosedForm, EraserSave, EraserLoad, EraserApply]
