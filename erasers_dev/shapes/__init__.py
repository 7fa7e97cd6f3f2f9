"""The shapes world: a small, real text-to-image diffusion model trained by the pack on CPU.

Same anatomy as Stable Diffusion (CLIP-like causal text encoder → cross-attention of a diffusers
``UNet2DConditionModel``, ε-prediction, DDIM, classifier-free guidance), in 16 px pixel space, so every
eraser can be run end to end and measured with the shipped classifier. Importing this package does no
work; weights load on first use of ``load_default()`` / ``load_classifier()``.
"""

from .classifier import ShapesClassifier, load_classifier, train_classifier
from .model import (
    ShapesModelConfig,
    ShapesPipeline,
    ShapesTextEncoderAdapter,
    UNetConfig,
    build_scheduler,
    build_unet,
    load_default,
    load_pipeline,
    random_pipeline,
    save_pipeline,
    text_encoder_adapter,
    to_pil_grid,
)
from .text_encoder import ShapesTextEncoder, TextEncoderConfig
from .tokenizer import ShapesTokenizer
from .world import BACKGROUNDS, COLOURS, SHAPES, STYLES, SYNONYMS, render, sample_batch

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "STYLES",
    "SYNONYMS",
    "ShapesClassifier",
    "ShapesModelConfig",
    "ShapesPipeline",
    "ShapesTextEncoder",
    "ShapesTextEncoderAdapter",
    "ShapesTokenizer",
    "TextEncoderConfig",
    "UNetConfig",
    "build_scheduler",
    "build_unet",
    "load_classifier",
    "load_default",
    "load_pipeline",
    "random_pipeline",
    "render",
    "sample_batch",
    "save_pipeline",
    "text_encoder_adapter",
    "to_pil_grid",
    "train_classifier",
]
