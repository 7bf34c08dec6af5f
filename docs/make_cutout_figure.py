"""The README's cutout figure: a synthetic photo (benchmarks/synthetic_composites.py) cut out with its true
alpha and put on a new background, without and with colour decontamination (estimate_foreground).

    python docs/make_cutout_figure.py        # writes docs/images/cutout_decontamination.jpg
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic_composites import make_composite  # noqa: E402
from diffdis_core.matting import estimate_foreground  # noqa: E402

OUTPUT = ROOT / "docs" / "images" / "cutout_decontamination.jpg"
NEW_BACKGROUND = (0.93, 0.9, 0.86)  # a light warm grey: the old background's blue-green shows on it as a fringe
CROP = (slice(45, 195), slice(160, 360))  # the hair, in the 480 x 640 composite
ZOOM = 3


def to_image(rgb: torch.Tensor) -> Image.Image:
    pixels = (rgb[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    return image.resize((image.width * ZOOM, image.height * ZOOM), Image.NEAREST)


def main() -> None:
    composite = make_composite(480, 640, seed=0, noise=0.005)
    image, alpha = composite["image"], composite["alpha"]
    background = torch.tensor(NEW_BACKGROUND).view(1, 3, 1, 1)
    plain = alpha * image + (1 - alpha) * background
    clean = alpha * estimate_foreground(image, alpha) + (1 - alpha) * background
    panels = [("synthetic picture", image), ("new background, image's pixels", plain),
              ("new background, estimate_foreground", clean)]
    crops = [(label, to_image(rgb[..., CROP[0], CROP[1]])) for label, rgb in panels]
    width, height = crops[0][1].size
    gap, caption = 8, 28
    figure = Image.new("RGB", (len(crops) * width + (len(crops) - 1) * gap, height + caption), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default(size=18)
    for i, (label, crop) in enumerate(crops):
        x = i * (width + gap)
        figure.paste(crop, (x, caption))
        draw.text((x + 4, 4), label, fill="black", font=font)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.save(OUTPUT, quality=88, optimize=True)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({os.path.getsize(OUTPUT) // 1024} KB)")


if __name__ == "__main__":
    main()
