"""The check's picture: rows = probes, columns = (before, after) per seed, labelled, pure torch.

Geometry (every length in pixels; ``s`` = the label font scale, ``k`` = the tile upscale factor):
    pad      = 2·s
    header   = 8·s + 2·pad                       (one line of column labels)
    label_w  = 6·s·max_chars + 2·pad             (row labels, wrapped to ``max_chars`` per line)
    width    = label_w + n_cols·(k·W + pad) + pad
    height   = header  + n_rows·(k·H + pad) + pad
``grid_geometry`` computes it and ``compose_grid`` draws it; images are (H, W, 3) floats in [0, 1]
(ComfyUI's IMAGE layout without the batch axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .font import CELL_H, CELL_W, text_mask

BACKGROUND = (1.0, 1.0, 1.0)
INK = (0.0, 0.0, 0.0)
#: an "after" column's header is drawn in this colour, so before/after read at a glance
AFTER_INK = (0.75, 0.05, 0.05)


def label_scale(tile_h: int) -> int:
    """Font scale for tiles of this height: 1 for small tiles, 2 at 256 px, 4 at 512 px."""
    return max(1, min(4, tile_h // 128))


@dataclass(frozen=True)
class GridGeometry:
    n_rows: int
    n_cols: int
    tile_h: int  # after upscaling
    tile_w: int
    scale: int  # label font scale
    max_chars: int  # row label characters per line

    @property
    def pad(self) -> int:
        return 2 * self.scale

    @property
    def header(self) -> int:
        return CELL_H * self.scale + 2 * self.pad

    @property
    def label_w(self) -> int:
        return CELL_W * self.scale * self.max_chars + 2 * self.pad

    @property
    def width(self) -> int:
        return self.label_w + self.n_cols * (self.tile_w + self.pad) + self.pad

    @property
    def height(self) -> int:
        return self.header + self.n_rows * (self.tile_h + self.pad) + self.pad

    @property
    def label_lines(self) -> int:
        """How many label lines fit beside one tile."""
        return max(1, self.tile_h // (CELL_H * self.scale))

    def tile_origin(self, row: int, col: int) -> tuple:
        """(y, x) of the top-left pixel of tile (row, col)."""
        return self.header + row * (self.tile_h + self.pad), self.label_w + col * (self.tile_w + self.pad)

    def to_dict(self) -> dict:
        return {
            "rows": self.n_rows,
            "columns": self.n_cols,
            "tile": [self.tile_h, self.tile_w],
            "size": [self.height, self.width],
            "label_scale": self.scale,
        }


def grid_geometry(
    n_rows: int, n_cols: int, image_h: int, image_w: int, upscale: int = 1, max_chars: int = 28
) -> GridGeometry:
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"A check grid needs at least one row and one column, found {n_rows}×{n_cols}.")
    tile_h, tile_w = image_h * upscale, image_w * upscale
    scale = label_scale(tile_h)
    # tiles wide enough for their column label ("seed 12345 after" ≈ 16 characters)
    return GridGeometry(n_rows, n_cols, tile_h, tile_w, scale, max_chars)


def wrap(text: str, width: int, max_lines: int) -> list:
    """Greedy word wrap to ``width`` characters, at most ``max_lines`` (the last one ends in '..' if cut)."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    out, line = [], ""
    for word in text.split():
        while len(word) > width:  # a word longer than a line is split
            if line:
                out.append(line)
                line = ""
            out.append(word[:width])
            word = word[width:]
        candidate = f"{line} {word}" if line else word
        if len(candidate) <= width:
            line = candidate
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = out[-1][: max(0, width - 2)] + ".."
    return out


def draw_text(canvas: torch.Tensor, text: str, y: int, x: int, scale: int, colour=INK, max_w=None) -> None:
    """Stamp one line of text onto ``canvas`` (H, W, 3) in place, clipped to the canvas (and ``max_w``)."""
    mask = text_mask(text, scale)
    h = min(mask.shape[0], canvas.shape[0] - y)
    w = min(mask.shape[1], canvas.shape[1] - x, max_w if max_w is not None else mask.shape[1])
    if h <= 0 or w <= 0:
        return
    region = canvas[y : y + h, x : x + w]
    region[mask[:h, :w]] = torch.tensor(colour, dtype=canvas.dtype)


def compose_grid(
    images: torch.Tensor,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    upscale: int = 1,
    max_chars: int = 28,
) -> torch.Tensor:
    """``images`` (rows, cols, H, W, 3) in [0, 1] → one labelled (height, width, 3) image."""
    if images.dim() != 5 or images.shape[-1] != 3:
        raise ValueError(f"Expected images as (rows, columns, H, W, 3), found {tuple(images.shape)}.")
    n_rows, n_cols, h, w, _ = images.shape
    if len(row_labels) != n_rows or len(column_labels) != n_cols:
        raise ValueError(
            f"{n_rows}×{n_cols} images need {n_rows} row and {n_cols} column labels, found "
            f"{len(row_labels)} and {len(column_labels)}."
        )
    g = grid_geometry(n_rows, n_cols, h, w, upscale, max_chars)
    canvas = torch.empty(g.height, g.width, 3, dtype=torch.float32)
    canvas[:] = torch.tensor(BACKGROUND)
    tiles = images.detach().to("cpu", torch.float32).clamp(0, 1)
    if upscale > 1:
        tiles = tiles.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    line_h = CELL_H * g.scale
    for c, label in enumerate(column_labels):
        _, x = g.tile_origin(0, c)
        colour = AFTER_INK if "after" in label else INK
        draw_text(canvas, str(label), g.pad, x, g.scale, colour, max_w=g.tile_w)
    for r, label in enumerate(row_labels):
        y0, _ = g.tile_origin(r, 0)
        for i, text in enumerate(wrap(str(label), g.max_chars, g.label_lines)):
            draw_text(canvas, text, y0 + i * line_h, g.pad, g.scale, max_w=g.label_w - 2 * g.pad)
        for c in range(n_cols):
            y, x = g.tile_origin(r, c)
            canvas[y : y + g.tile_h, x : x + g.tile_w] = tiles[r, c]
    return canvas
