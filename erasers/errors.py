"""Exceptions raised by the core.

Every error says what was expected, what was found, where (file / layer / concept) and what to do.
They subclass ValueError so hosts that already catch ValueError for bad input keep working.
"""

from __future__ import annotations


class EraserError(ValueError):
    """Base class of every error the pack raises for bad input. Nothing is patched when it is raised."""


class EmptyConceptList(EraserError):
    pass


class ConceptTooLong(EraserError):
    pass


class FamilyMismatch(EraserError):
    """An object (text encoder, eraser file, membrane) belongs to another model family than the model."""


class UnsupportedFamily(EraserError):
    """The method cannot serve this model family; the message names the families it does support."""


class UnknownKeys(EraserError):
    """A file holds keys that match no layer of the model; the message lists them."""


class NonFiniteResult(EraserError):
    """The closed form produced NaN or Inf (usually an ill-conditioned system: raise λ)."""


class BadEraserFile(EraserError):
    """A file is not a readable .safetensors eraser (truncated, pickled, wrong layout)."""


class MissingTokenizer(EraserError):
    """No CLIP tokenizer could be found for a single-file checkpoint."""


class EraserAlreadyApplied(EraserError):
    """An eraser is already written into these weights; remove it before applying another."""


class RefusedPath(EraserError):
    """A file name or folder a host route refuses to serve (traversal, absolute path, unknown folder)."""


class UnknownFormat(BadEraserFile):
    """No format recogniser accepted a file; the message lists every format tried."""
