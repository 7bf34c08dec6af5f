"""The pack's icon (pyproject.toml's [tool.comfy] Icon; the Registry asks for a square of at most 400 px):
a dandelion clock, the kind of fine, see-through detail DiffDIS is for, cut out of a sky along a
diagonal: photo above the cut, transparency (a checkerboard) below it. Drawn, not a model's output.

    python docs/make_icon.py        # writes docs/images/icon.png
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "images" / "icon.png"
SIZE = 400  # the Registry's maximum
SUPERSAMPLE = 4  # drawn at 4x and reduced: smooth edges without relying on PIL's anti-aliasing
SKY_TOP, SKY_BOTTOM = (38, 84, 160), (120, 178, 222)
CHECKER = ((58, 60, 68), (92, 95, 105))  # dark, as dark-theme editors show transparency: white seeds stay visible
SEED_COLOUR, STEM_COLOUR = (255, 255, 255), (92, 140, 70)


def sky(size: int) -> Image.Image:
    column = Image.new("RGB", (1, size))
    for y in range(size):
        t = y / (size - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(SKY_TOP, SKY_BOTTOM, strict=True)))
    return column.resize((size, size))


def checkerboard(size: int, squares: int = 8) -> Image.Image:
    board = Image.new("RGB", (size, size), CHECKER[1])
    draw = ImageDraw.Draw(board)
    step = size / squares
    for row in range(squares):
        for col in range(squares):
            if (row + col) % 2 == 0:
                draw.rectangle([col * step, row * step, (col + 1) * step, (row + 1) * step], fill=CHECKER[0])
    return board


def draw_dandelion(draw: ImageDraw.ImageDraw, size: int) -> None:
    """A stem and a clock of seeds: each a thin filament ending in a small fan of hairs."""
    cx, cy, radius = 0.5 * size, 0.42 * size, 0.27 * size
    stroke = max(1, size // 400)
    draw.line([(cx, cy), (cx + 0.04 * size, 0.97 * size)], fill=STEM_COLOUR, width=6 * stroke)
    rng = random.Random(7)  # fixed: the same icon every run
    for i in range(64):
        angle = 2 * math.pi * i / 64 + rng.uniform(-0.03, 0.03)
        length = radius * rng.uniform(0.88, 1.0)
        tip = (cx + length * math.cos(angle), cy + length * math.sin(angle))
        draw.line([(cx, cy), tip], fill=SEED_COLOUR, width=stroke)
        for spread in (-0.5, -0.25, 0.0, 0.25, 0.5):  # the pappus: hairs fanning out from the tip
            hair = angle + spread
            end = (tip[0] + 0.07 * size * math.cos(hair), tip[1] + 0.07 * size * math.sin(hair))
            draw.line([tip, end], fill=SEED_COLOUR, width=stroke)
    core = 0.035 * size
    draw.ellipse([cx - core, cy - core, cx + core, cy + core], fill=(150, 120, 80))


def make_icon() -> Image.Image:
    big = SIZE * SUPERSAMPLE
    photo, cut_out = sky(big), checkerboard(big)
    for layer in (photo, cut_out):
        draw_dandelion(ImageDraw.Draw(layer), big)
    # Photo above the diagonal, the cutout below it, a thin white line along the cut.
    below = Image.new("L", (big, big), 0)
    ImageDraw.Draw(below).polygon([(0, big), (big, 0.35 * big), (big, big)], fill=255)
    icon = Image.composite(cut_out, photo, below)
    ImageDraw.Draw(icon).line([(0, big), (big, 0.35 * big)], fill=(255, 255, 255), width=3 * SUPERSAMPLE)
    # Rounded corners, transparent outside: how icon slots show it.
    corners = Image.new("L", (big, big), 0)
    ImageDraw.Draw(corners).rounded_rectangle([0, 0, big - 1, big - 1], radius=0.14 * big, fill=255)
    icon.putalpha(corners)
    return icon.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    make_icon().save(OUTPUT, optimize=True)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({os.path.getsize(OUTPUT) // 1024} KB)")


if __name__ == "__main__":
    main()
