"""The shapes world: a synthetic image/caption generator the toy text-to-image model is trained on.

Every image is one shape (circle, square, …) in one colour and one style (plain, striped, outline) on a
plain background, at a random position and size. Captions come from templates and use synonyms ("ball"
for circle), so that erasing a word can be checked on paraphrases. Everything is deterministic given a
``torch.Generator``: the same seed gives the same images and captions on every machine.

Rendering is analytic: each shape is a set of half-planes / discs evaluated on a grid supersampled 4×
and average-pooled, so edges are anti-aliased and nothing depends on a drawing library.

Held-out material (never produced by ``sample_batch``) is listed at the bottom: paraphrase templates
built only from words the model has seen, and (synonym, colour) pairs that training never combines.
A word the tokenizer never saw in training maps to a random, untrained embedding, so held-out *words*
would measure nothing; held-out *phrasings* and *combinations* do.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SHAPES: List[str] = ["circle", "square", "triangle", "cross"]
COLOURS: List[str] = ["red", "green", "blue", "yellow", "purple"]
STYLES: List[str] = ["plain", "striped", "outline"]
BACKGROUNDS: List[str] = ["white", "black", "gray"]

#: RGB in [0, 1]; a small per-image jitter is added when sampling.
COLOUR_RGB: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
}
BACKGROUND_RGB: Dict[str, Tuple[float, float, float]] = {
    "white": (0.96, 0.96, 0.96),
    "black": (0.04, 0.04, 0.04),
    "gray": (0.50, 0.50, 0.50),
}

#: Words used for each concept in training captions (the canonical word first).
SYNONYMS: Dict[str, List[str]] = {
    "circle": ["circle", "ball", "disc"],
    "square": ["square", "box"],
    "triangle": ["triangle", "wedge"],
    "cross": ["cross", "plus"],
    "red": ["red", "scarlet"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "plain": ["plain", "solid"],
    "striped": ["striped"],
    "outline": ["outline", "hollow"],
    "white": ["white"],
    "black": ["black"],
    "gray": ["gray", "grey"],
}

#: Training caption templates. {s}=shape word, {c}=colour word, {st}=style word, {bg}=background word.
TEMPLATES: List[str] = [
    "a {c} {s}",
    "{c} {s}",
    "a {st} {c} {s}",
    "a {c} {s} on {bg}",
    "a {st} {c} {s} on {bg}",
    "a {st} {c} {s} on a {bg} background",
    "a {c} {s} on a {bg} background",
    "a picture of a {c} {s}",
    "a picture of a {st} {c} {s}",
    "the {s} is {c}",
    "a {s} that is {c}",
    "a {s} , {c} , {st}",
    "a {c} {st} {s}",
    "a {s} in {c}",
]

#: Paraphrase templates used only for evaluation; every word in them occurs in training captions.
HELDOUT_TEMPLATES: List[str] = [
    "a picture of the {s} that is {c}",
    "the {c} {s} on a {bg} background is {st}",
    "{c} {s} , a picture",
    "a {st} {s} that is {c}",
    "the {s} in {c} on {bg}",
]

#: (synonym, colour) pairs that training captions never combine; used to test compositional paraphrase.
HELDOUT_SYNONYM_COLOURS: List[Tuple[str, str]] = [
    ("ball", "blue"),
    ("disc", "red"),
    ("box", "yellow"),
    ("wedge", "green"),
    ("plus", "purple"),
]

_SUPERSAMPLE = 4
_COLOUR_JITTER = 0.06


def vocabulary() -> List[str]:
    """Every word a caption (training or held-out) can contain, sorted; the tokenizer's word list."""
    words = set()
    for syns in SYNONYMS.values():
        words.update(syns)
    for template in TEMPLATES + HELDOUT_TEMPLATES:
        for word in template.replace(",", " , ").split():
            if not word.startswith("{"):
                words.add(word)
    words.discard(",")
    return sorted(words)


# ----------------------------------------------------------------------------------------------- render


def _shape_masks(shape_idx, cx, cy, r, grid_y, grid_x) -> torch.Tensor:
    """Soft-free binary masks (n, H, W) of each sample's shape on the supersampled grid."""
    dx = grid_x - cx[:, None, None]
    dy = grid_y - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx * dx + dy * dy <= rr * rr
    half = 0.82 * rr
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # upward triangle with apex (0,-r) and base at y=+0.8r spanning x in [-r, r]
    base = 0.8 * rr
    slope = (dy + rr) / (base + rr)  # 0 at apex, 1 at base
    triangle = (dy <= base) & (dy >= -rr) & (dx.abs() <= slope * rr)
    arm = 0.34 * rr
    cross = ((dx.abs() <= arm) & (dy.abs() <= rr)) | ((dy.abs() <= arm) & (dx.abs() <= rr))
    stack = torch.stack([circle, square, triangle, cross], dim=1)  # (n, 4, H, W)
    return stack[torch.arange(len(shape_idx)), shape_idx]


def _render_batch(shape_idx, colour_rgb, style_idx, bg_rgb, cx, cy, r, stripe_phase, size: int) -> torch.Tensor:
    """Images (n, 3, size, size) in [0, 1]. Positions and radius are in output pixels."""
    n = len(shape_idx)
    ss = _SUPERSAMPLE
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    mask = _shape_masks(shape_idx, cx, cy, r, grid_y[None], grid_x[None]).float()  # (n, H, W)
    # outline: the mask minus its erosion by ~1.3 output pixels
    # (a square erosion is separable: two 1-D min-pools, computed only for the outline samples)
    k = int(round(1.3 * ss)) * 2 + 1
    outline = mask.clone()
    sel = style_idx == STYLES.index("outline")
    if sel.any():
        m = -mask[sel][:, None]
        m = F.max_pool2d(m, (k, 1), stride=1, padding=(k // 2, 0))
        eroded = -F.max_pool2d(m, (1, k), stride=1, padding=(0, k // 2))[:, 0]
        outline[sel] = mask[sel] * (1 - eroded)
    # stripes: horizontal bands, period 4 output pixels, random phase; the gaps are half-way between the
    # colour and the background so the silhouette (and so the shape) stays visible at 16 px
    band = (((grid_y[None] + stripe_phase[:, None, None]) % 4.0) < 2.0).float()
    striped = mask * (0.5 + 0.5 * band)
    fill = torch.stack([mask, striped, outline], dim=1)[torch.arange(n), style_idx]  # (n, H, W)
    img = bg_rgb[:, :, None, None] * (1 - fill[:, None]) + colour_rgb[:, :, None, None] * fill[:, None]
    return F.avg_pool2d(img, ss).clamp(0, 1)


def _table(names: Sequence[str], rgb: Dict[str, Tuple[float, float, float]]) -> torch.Tensor:
    return torch.tensor([rgb[name] for name in names], dtype=torch.float32)


def render(
    shape: str,
    colour: str,
    style: str = "plain",
    background: str = "white",
    position: Tuple[float, float] = (0.5, 0.5),
    size: int = 16,
    radius: float = 0.33,
) -> torch.Tensor:
    """One image (3, size, size) in [-1, 1], no jitter. ``position`` and ``radius`` are fractions of size."""
    for value, allowed, what in (
        (shape, SHAPES, "shape"),
        (colour, COLOURS, "colour"),
        (style, STYLES, "style"),
        (background, BACKGROUNDS, "background"),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {what} '{value}'; expected one of {allowed}.")
    img = _render_batch(
        torch.tensor([SHAPES.index(shape)]),
        _table([colour], COLOUR_RGB),
        torch.tensor([STYLES.index(style)]),
        _table([background], BACKGROUND_RGB),
        torch.tensor([position[0] * size]),
        torch.tensor([position[1] * size]),
        torch.tensor([radius * size]),
        torch.zeros(1),
        size,
    )
    return img[0] * 2 - 1


# ---------------------------------------------------------------------------------------------- sample


def _pick(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def caption_for(
    shape: str,
    colour: str,
    style: str,
    background: str,
    generator: torch.Generator,
    templates: Optional[Sequence[str]] = None,
    heldout: bool = False,
) -> str:
    """A caption for the labels, drawn from ``templates`` (training templates by default).

    Training captions (``heldout=False``) never use a pair in ``HELDOUT_SYNONYM_COLOURS``.
    """
    template = _pick(list(templates or TEMPLATES), generator)
    colour_word = _pick(SYNONYMS[colour], generator)
    shape_words = SYNONYMS[shape]
    if not heldout:
        banned = {syn for syn, col in HELDOUT_SYNONYM_COLOURS if col == colour}
        shape_words = [w for w in shape_words if w not in banned]
    words = dict(
        s=_pick(shape_words, generator),
        c=colour_word,
        st=_pick(SYNONYMS[style], generator),
        bg=_pick(SYNONYMS[background], generator),
    )
    return template.format(**words)


def sample_labels(n: int, generator: torch.Generator, size: int = 16) -> Dict[str, torch.Tensor]:
    """Random labels and geometry for ``n`` images."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    style = torch.randint(len(STYLES), (n,), generator=generator)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=generator)
    radius = (0.25 + 0.12 * torch.rand(n, generator=generator)) * size
    margin = radius + 0.5
    cx = margin + torch.rand(n, generator=generator) * (size - 2 * margin)
    cy = margin + torch.rand(n, generator=generator) * (size - 2 * margin)
    phase = torch.rand(n, generator=generator) * 4.0
    jitter = (torch.rand(n, 3, generator=generator) * 2 - 1) * _COLOUR_JITTER
    return dict(
        shape=shape,
        colour=colour,
        style=style,
        background=background,
        radius=radius,
        cx=cx,
        cy=cy,
        phase=phase,
        jitter=jitter,
    )


def render_labels(labels: Dict[str, torch.Tensor], size: int = 16) -> torch.Tensor:
    """Images (n, 3, size, size) in [-1, 1] for labels from ``sample_labels``."""
    colour_rgb = (_table(COLOURS, COLOUR_RGB)[labels["colour"]] + labels["jitter"]).clamp(0, 1)
    bg_rgb = _table(BACKGROUNDS, BACKGROUND_RGB)[labels["background"]]
    img = _render_batch(
        labels["shape"],
        colour_rgb,
        labels["style"],
        bg_rgb,
        labels["cx"],
        labels["cy"],
        labels["radius"],
        labels["phase"],
        size,
    )
    return img * 2 - 1


def sample_batch(
    n: int,
    generator: torch.Generator,
    size: int = 16,
    templates: Optional[Sequence[str]] = None,
    heldout: bool = False,
) -> Tuple[torch.Tensor, List[str], Dict[str, torch.Tensor]]:
    """``n`` random images in [-1, 1] (n, 3, size, size), their captions, and their labels.

    labels: int64 tensors ``shape``, ``colour``, ``style``, ``background`` (indices into the lists
    above) plus the geometry (``cx``, ``cy``, ``radius`` in pixels).
    """
    labels = sample_labels(n, generator, size)
    images = render_labels(labels, size)
    captions = [
        caption_for(
            SHAPES[int(labels["shape"][i])],
            COLOURS[int(labels["colour"][i])],
            STYLES[int(labels["style"][i])],
            BACKGROUNDS[int(labels["background"][i])],
            generator,
            templates,
            heldout,
        )
        for i in range(n)
    ]
    return images, captions, labels
