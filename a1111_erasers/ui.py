"""The "Concept Erasers" accordion. gradio is imported inside ``build`` (the webui provides it).

Components are returned in ``settings.ARG_ORDER`` — the order of the script args and of the API's
``alwayson_scripts`` args. Widgets only use features common to gradio 3.41 (A1111 1.10) and gradio 4
(Forge 2).
"""

from __future__ import annotations

from . import plugins
from .settings import ARG_ORDER, GUARD_PRESETS, GUARDS, INFOTEXT_KEY, UISettings, paste_getter


def method_choices() -> list:
    from .core import core_module

    return list(core_module("edits.methods").METHODS)


def build(script, is_img2img: bool, controller) -> list:
    import gradio as gr

    defaults = UISettings()
    tab = "img2img" if is_img2img else "txt2img"
    backend = controller.backend
    comps = {}
    with gr.Accordion("Concept Erasers", open=False, elem_id=f"concept_erasers_{tab}"):
        gr.Markdown(backend.message(), elem_classes=["concept-erasers-backend"])
        comps["enabled"] = gr.Checkbox(
            label="Enable",
            value=defaults.enabled,
            interactive=backend.supported,
            elem_id=f"concept_erasers_{tab}_enabled",
        )
        with gr.Group():
            gr.Markdown(
                "**Closed-form erasure** — edits the cross-attention K/V projections (computed once per "
                "model and settings, then cached)."
            )
            with gr.Row():
                comps["method"] = gr.Dropdown(label="Method", choices=method_choices(), value=defaults.method)
                comps["strength"] = gr.Slider(
                    label="Strength", minimum=0.0, maximum=2.0, step=0.05, value=defaults.strength
                )
            comps["concepts"] = gr.Textbox(
                label="Concepts to erase (one per line)", lines=2, placeholder="Van Gogh\nSnoopy"
            )
            with gr.Row():
                comps["anchors"] = gr.Textbox(
                    label="Anchors (one per concept, or one for all; empty = method default)",
                    lines=1,
                    placeholder="art",
                )
                comps["preserve"] = gr.Textbox(label="Preserve (one per line)", lines=1, placeholder="Monet\nPicasso")
            comps["method_options"] = gr.Textbox(
                label="Method options (JSON)", lines=1, placeholder='{"lam": 0.5, "variant": "2025"}'
            )
        with gr.Group():
            gr.Markdown(
                "**Eraser files and SPM membranes** — from `models/erasers` and `models/spm` (or use "
                "the `<eraser:name:w>` / `<spm:name:w>` tags from the extra-networks cards)."
            )
            with gr.Row():
                comps["eraser_files"] = gr.Dropdown(
                    label="Eraser files", multiselect=True, choices=sorted(controller.available("eraser")), value=[]
                )
                comps["eraser_weight"] = gr.Slider(
                    label="Eraser file weight", minimum=0.0, maximum=2.0, step=0.05, value=defaults.eraser_weight
                )
            spm_ok = plugins.spm_available()
            if not spm_ok:
                gr.Markdown(plugins.spm_unavailable_message())
            with gr.Row():
                comps["spm_files"] = gr.Dropdown(
                    label="SPM membranes",
                    multiselect=True,
                    interactive=spm_ok,
                    choices=sorted(controller.available("spm")),
                    value=[],
                )
                comps["spm_weight"] = gr.Slider(
                    label="SPM weight",
                    minimum=0.0,
                    maximum=2.0,
                    step=0.05,
                    value=defaults.spm_weight,
                    interactive=spm_ok,
                )
                comps["spm_transport"] = gr.Checkbox(
                    label="Facilitated transport", value=defaults.spm_transport, interactive=spm_ok
                )
        with gr.Group():
            gr.Markdown("**Sampling-time guards** — steer sampling away from the concepts (no weight change).")
            message = plugins.guard_unavailable_message(backend=backend)
            if message:
                gr.Markdown(message)
            usable = [g for g in GUARDS if plugins.guard_available(g, backend)]
            with gr.Row():
                comps["guards"] = gr.Dropdown(
                    label="Guards", multiselect=True, choices=usable, value=[], interactive=bool(usable)
                )
                comps["guard_preset"] = gr.Dropdown(
                    label="Preset", choices=list(GUARD_PRESETS), value=defaults.guard_preset, interactive=bool(usable)
                )
            comps["guard_concepts"] = gr.Textbox(
                label="Guard concepts (empty = the concepts to erase)", lines=1, interactive=bool(usable)
            )
    components = [comps[name] for name in ARG_ORDER]
    script.infotext_fields = [(comps[name], paste_getter(name)) for name in ARG_ORDER]
    script.paste_field_names = [INFOTEXT_KEY]
    return components
