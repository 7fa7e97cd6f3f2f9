"""World 2: a truer efficacy world (issue 15) — painters' styles, named characters and an implicit unsafe proxy.

Same anatomy as the shapes world (CLIP-like causal text encoder → cross-attention of a diffusers
``UNet2DConditionModel``, ε-prediction, DDIM, classifier-free guidance) at 32 px, but the text encoder is
trained contrastively against an image encoder first and then frozen, as Stable Diffusion reads a frozen
CLIP. ``world`` generates the images and captions, ``clip`` the contrastive stage, ``model`` the
pipeline and its file, ``train`` the whole run (``python -m erasers world2 train``), ``judges`` one
classifier per axis, ``evaluate`` base fidelity. Importing this package does no work.
"""

from .model import World2Pipeline, World2TextEncoderAdapter, load_pipeline, save_pipeline
from .tokenizer import World2Tokenizer
from .world import ARTISTS, BACKGROUNDS, CHARACTERS, COLOURS, OBJECTS, render, sample_batch

__all__ = [
    "ARTISTS",
    "BACKGROUNDS",
    "CHARACTERS",
    "COLOURS",
    "OBJECTS",
    "World2Pipeline",
    "World2TextEncoderAdapter",
    "World2Tokenizer",
    "load_pipeline",
    "render",
    "sample_batch",
    "save_pipeline",
]
