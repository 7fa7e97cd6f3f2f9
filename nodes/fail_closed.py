"""Fail closed: when a node cannot do what the user asked, it raises before sampling.

A safety node that logs a line and lets an unerased image through is worse than no node — the user believes
the concept is gone. So every "cannot" (no prompt text found, attention owned by another node, an unknown
model class) is an error, unless the user switched on the node's explicit ``allow_pass_through`` input; then
the node passes through, logs a warning and shows it on the node in the UI.

Nodes that read the running workflow (the hidden PROMPT graph) depend on more than their inputs. ComfyUI
fingerprints a node from its own widget values only (its hidden inputs are empty at that point), so such
a node declares ``fingerprint_inputs = rerun_every_queue``: an edit of the prompt text elsewhere then
re-runs it instead of reusing the MODEL prepared for the old prompt.
"""

from __future__ import annotations

import logging

from ..erasers.errors import EraserError

log = logging.getLogger(__name__)


class ErasureNotApplied(EraserError):
    """The node cannot apply the erasure the user asked for; nothing was patched."""


def pass_through_input():
    from comfy_api.latest import io  # here, so the rest of this module is unit-testable without ComfyUI

    return io.Boolean.Input(
        "allow_pass_through",
        default=False,
        optional=True,
        tooltip="Off (recommended): the node stops the run with an error when it cannot apply the erasure. "
        "On: it passes the model through unerased and shows a warning on the node.",
    )


def cannot(node: str, reason: str, allow_pass_through: bool, unique_id=None) -> None:
    """Raise ErasureNotApplied(reason), or — only with allow_pass_through — warn in the log and on the node."""
    message = f"{node}: {reason}"
    if not allow_pass_through:
        raise ErasureNotApplied(
            message + " Nothing was erased, so the run is stopped. (Turn on 'allow_pass_through' to let the "
            "model through unerased instead.)"
        )
    log.warning("%s — passing the model through unerased (allow_pass_through is on).", message)
    show_on_node(unique_id, "NOT ERASED: " + reason)


def show_on_node(unique_id, text: str) -> None:
    """The warning as progress text on the node (the frontend shows it under the node's title)."""
    if unique_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, unique_id)
    except Exception:  # no server (unit tests, scripts): the log line above is the record
        log.debug("could not show the warning on node %s", unique_id, exc_info=True)


def rerun_every_queue(cls, **_inputs):
    """fingerprint_inputs for nodes that read the workflow graph: NaN never equals itself, so ComfyUI
    treats the node as changed on every queue (the IS_CHANGED convention) and re-reads the graph."""
    return float("nan")
