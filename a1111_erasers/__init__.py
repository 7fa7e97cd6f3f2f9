"""Concept Erasers — Automatic1111 / Forge glue.

A thin layer between the webui and the host-agnostic core in ``erasers/``. Nothing here imports a webui
module at import time: host modules (``networks``, ``modules.extra_networks``, gradio …) are passed in or
imported inside functions, so the glue is unit-tested with small fakes.

The webui entry (``scripts/concept_erasers_a1111.py``) loads this package under the unique module name
``concept_erasers_a1111_glue`` and the core under ``concept_erasers_core`` (see ``core.py``): an
extension folder sits on ``sys.path`` and modules are cached by name, so a bare ``import erasers`` could
pick up another extension's module of the same name.
"""
