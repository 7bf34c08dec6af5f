"""Synthetic cutouts with a known answer, shared by benchmarks/cutout.py, docs/make_cutout_figure.py and
tests/test_matting.py.

``make_composite(height, width, seed)`` draws a colourful textured foreground and background and an alpha
matte with what makes cutouts hard: hair-like strands (0.5-2.5 px wide, so mostly soft), holes, a
motion-blurred side and a semi-transparent (glass-like) patch. The image is ``alpha * F + (1 - alpha) * B``,
so the true foreground colours and the true matte are known everywhere. The metrics below are the ones the
issue's table uses.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4  # the matte is drawn at 4x and box-reduced: strands thinner than a pixel get their coverage


def _colour_field(height: int, width: int, generator: torch.Generator, palette: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1]: smooth colour blobs at a few scales plus fine texture, in the palette's range."""
    field = torch.zeros(3, height, width)
    side = max(height, width)
    for cells, weight in ((3, 1.0), (9, 0.5), (40, 0.25)):
        coarse = torch.rand(1, 3, max(2, cells * height // side), max(2, cells * width // side), generator=generator)
        field += weight * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    field = field / 1.75
    field += 0.12 * (torch.rand(3, height, width, generator=generator) - 0.5)  # pixel-level texture
    low, high = palette[:, 0, None, None], palette[:, 1, None, None]
    return (low + (high - low) * field).clamp(0, 1)


def _matte(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [H, W] alpha in [0, 1]."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = width * s / 2, height * s / 2
    radius = 0.3 * min(width, height) * s
    # The body: a blob whose radius wanders smoothly with the angle.
    angles = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    wobble = sum(rng.uniform(0.03, 0.09) * np.sin(k * angles + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5, 8))
    radii = radius * (1 + wobble)
    body = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    draw.polygon(body, fill=255)
    # Holes, fully transparent.
    for _ in range(4):
        hx, hy = cx + rng.uniform(-0.45, 0.45) * radius, cy + rng.uniform(-0.45, 0.45) * radius
        hr = rng.uniform(0.05, 0.12) * radius
        draw.ellipse([hx - hr, hy - hr * 0.7, hx + hr, hy + hr * 0.7], fill=0)
    # A glass-like patch: semi-transparent.
    gx, gy, gr = cx + 0.2 * radius, cy - 0.35 * radius, 0.18 * radius
    draw.ellipse([gx - gr, gy - gr, gx + gr, gy + gr], fill=int(rng.uniform(90, 160)))
    # Hair: strands leaving the upper half of the body, curling as they go.
    n_strands = int(60 + 0.12 * (width + height))
    for _ in range(n_strands):
        theta = rng.uniform(math.pi * 1.05, math.pi * 1.95)  # the top (image y grows downwards)
        i = int(theta / (2 * math.pi) * len(angles)) % len(angles)
        x, y = body[i]
        x, y = x - 0.02 * radius * math.cos(theta), y - 0.02 * radius * math.sin(theta)
        heading, turn = theta + rng.normal(0, 0.3), rng.normal(0, 0.02)
        length = rng.uniform(0.15, 0.6) * radius
        step = 3 * s
        points = [(x, y)]
        for _ in range(int(length / step)):
            heading += turn + rng.normal(0, 0.03)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((x, y))
        draw.line(points, fill=255, width=max(1, round(rng.uniform(0.5, 2.5) * s)), joint="curve")
    matte = canvas.reduce(s)
    # Motion blur on the right side: the edge smeared over ~12 px.
    blurred = matte.filter(ImageFilter.BoxBlur(6))
    side = Image.linear_gradient("L").rotate(90).resize(matte.size)  # 0 on the left .. 255 on the right
    side = side.point(lambda v: 255 if v > 180 else 0).filter(ImageFilter.GaussianBlur(8))
    matte = Image.composite(blurred, matte, side)
    return np.asarray(matte, dtype=np.float32) / 255.0


PALETTES = {  # per channel (low, high) of the foreground's and the background's colours
    # Warm foreground, cool background: a fringe of the old background shows plainly on a new one.
    "contrasting": ([[0.45, 1.0], [0.15, 0.75], [0.0, 0.45]], [[0.0, 0.35], [0.3, 0.9], [0.35, 1.0]]),
    # Overlapping colours: telling foreground from background by colour alone is harder.
    "similar": ([[0.15, 0.9], [0.15, 0.85], [0.1, 0.8]], [[0.1, 0.85], [0.15, 0.9], [0.15, 0.9]]),
}


def make_composite(height: int, width: int, seed: int = 0, palette: str = "contrasting",
                   noise: float = 0.0, fog: bool = False) -> dict[str, torch.Tensor]:
    """image, foreground, background [1, 3, H, W] and alpha [1, 1, H, W], float32 in [0, 1].

    ``noise``: the standard deviation of Gaussian noise added to the image (a camera's), not to F and B.
    ``fog``: instead of the object, an alpha that is soft everywhere (smoke, a veil): the hardest case for
    speed, as no part of the image can be skipped.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    fore_palette, back_palette = PALETTES[palette]
    foreground = _colour_field(height, width, generator, torch.tensor(fore_palette))
    background = _colour_field(height, width, generator, torch.tensor(back_palette))
    if fog:
        coarse = torch.rand(1, 1, max(2, height // 100), max(2, width // 100), generator=generator)
        alpha = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    else:
        alpha = torch.from_numpy(_matte(height, width, rng))[None]
    image = alpha * foreground + (1 - alpha) * background
    if noise:
        image = (image + noise * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    return {"image": image[None], "foreground": foreground[None], "background": background[None],
            "alpha": alpha[None]}


def soft(alpha: torch.Tensor) -> torch.Tensor:
    """Where the matte is neither 0 nor 1 (to 8-bit precision): hair, blur, glass."""
    return (alpha > 0.5 / 255) & (alpha < 1 - 0.5 / 255)


def foreground_error(estimate: torch.Tensor, truth: torch.Tensor, alpha: torch.Tensor) -> float:
    """Mean absolute colour error where alpha is soft, weighted by alpha (how much of it shows)."""
    weight = alpha * soft(alpha)
    error = (estimate.float() - truth.float()).abs().mean(dim=1, keepdim=True)
    return float((weight * error).sum() / weight.sum())


def edge_band(alpha: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within `width` px of a soft pixel or of a jump in the true matte."""
    jump = F.max_pool2d(alpha, 3, 1, 1) - (-F.max_pool2d(-alpha, 3, 1, 1)) > 0.5 / 255
    return F.max_pool2d((soft(alpha) | jump).float(), 2 * width + 1, 1, width) > 0


def alpha_errors(estimate: torch.Tensor, truth: torch.Tensor, band: torch.Tensor) -> tuple[float, float]:
    """Mean absolute matte error in the edge band and over the whole image."""
    error = (estimate.float() - truth.float()).abs()
    return float(error[band].mean()), float(error.mean())
