"""The Eraser Check (issue #17): did the erasure work on *this* model? Host-free core.

``probes`` lists what to render (the concept, other phrasings, the user's prompts, neighbours that must
survive, unrelated prompts, and for weight edits the closed-form c′ probe of ``adversarial``); a host
renders each before and after through its own sampler; ``run.run_check`` lays out the labelled grid
(``grid``, drawn with the bitmap font of ``font``: no imaging library) and writes the report
(``report``: JSON schema and a readable table), with shares of images showing the concept when a scorer
(``score``: CLIP zero-shot, or the shapes world's classifier) is given.
"""

from .adversarial import adversarial_context, response_gap
from .grid import compose_grid, grid_geometry
from .probes import Probe, build_probes, eraser_kind, lines
from .report import SCHEMA, report_table, report_text, validate_report
from .run import CheckResult, eraser_summary, run_check

__all__ = [
    "SCHEMA",
    "CheckResult",
    "Probe",
    "adversarial_context",
    "build_probes",
    "compose_grid",
    "eraser_kind",
    "eraser_summary",
    "grid_geometry",
    "lines",
    "report_table",
    "report_text",
    "response_gap",
    "run_check",
    "validate_report",
]
