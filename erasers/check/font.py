"""A 5×7 bitmap font for the check grid's labels: printable ASCII, drawn with torch only.

The core has no imaging dependency (no PIL), so labels are stamped from these glyphs. Each glyph is
seven rows of five pixels, written as 14 hex digits (one byte per row, bit 4 = the leftmost pixel).
Characters outside printable ASCII are drawn as '?'.
"""

from __future__ import annotations

import functools

import torch

#: glyph size in pixels and the cell it occupies (one blank column and one blank row of spacing)
GLYPH_W, GLYPH_H = 5, 7
CELL_W, CELL_H = 6, 8

# fmt: off
GLYPHS = {
    " ": "00000000000000", "!": "04040404040004", '"': "0a0a0000000000", "#": "0a0a1f0a1f0a0a",
    "$": "040f140e051e04", "%": "18190204081303", "&": "0c12140815120d", "'": "04040000000000",
    "(": "02040808080402", ")": "08040202020408", "*": "0004150e150400", "+": "0004041f040400",
    ",": "000000000c0408", "-": "0000001f000000", ".": "00000000000c0c", "/": "00010204081000",
    "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f", "3": "1f02040201110e",
    "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c", ":": "000c0c000c0c00", ";": "000c0c000c0408",
    "<": "02040810080402", "=": "00001f001f0000", ">": "08040201020408", "?": "0e110102040004",
    "@": "0e11010d15150e", "A": "0e1111111f1111", "B": "1e11111e11111e", "C": "0e11101010110e",
    "D": "1c12111111121c", "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f",
    "H": "1111111f111111", "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211",
    "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e",
    "P": "1e11111e101010", "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e",
    "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04",
    "W": "1111111515150a", "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    "[": "0e08080808080e", "\\": "00100804020100", "]": "0e02020202020e", "^": "040a1100000000",
    "_": "0000000000001f", "`": "08040000000000", "a": "00000e010f110f", "b": "1010161911111e",
    "c": "00000e1010110e", "d": "01010d1311110f", "e": "00000e111f100e", "f": "0609081c080808",
    "g": "000f11110f010e", "h": "10101619111111", "i": "04000c0404040e", "j": "0200060202120c",
    "k": "10101214181412", "l": "0c04040404040e", "m": "00001a15151111", "n": "00001619111111",
    "o": "00000e1111110e", "p": "00001e111e1010", "q": "00000d130f0101", "r": "00001619101010",
    "s": "00000e100e011e", "t": "08081c08080906", "u": "0000111111130d", "v": "00001111110a04",
    "w": "0000111115150a", "x": "0000110a040a11", "y": "000011110f010e",
    "z": "00001f0204081f", "{": "02040408040402", "|": "04040404040404", "}": "08040402040408",
    "~": "00000815020000",
}
# fmt: on


@functools.lru_cache(maxsize=None)
def glyph(char: str) -> torch.Tensor:
    """(CELL_H, CELL_W) bool mask of one character (the glyph in the top-left, spacing right and below)."""
    code = GLYPHS.get(char, GLYPHS["?"])
    rows = [int(code[2 * i : 2 * i + 2], 16) for i in range(GLYPH_H)]
    cell = torch.zeros(CELL_H, CELL_W, dtype=torch.bool)
    for y, bits in enumerate(rows):
        for x in range(GLYPH_W):
            cell[y, x] = bool(bits >> (GLYPH_W - 1 - x) & 1)
    return cell


def text_mask(text: str, scale: int = 1) -> torch.Tensor:
    """(CELL_H·scale, CELL_W·len(text)·scale) bool mask of one line of text."""
    if not text:
        return torch.zeros(CELL_H * scale, 0, dtype=torch.bool)
    line = torch.cat([glyph(c) for c in text], dim=1)
    if scale > 1:
        line = line.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return line


def text_width(n_chars: int, scale: int = 1) -> int:
    return n_chars * CELL_W * scale
