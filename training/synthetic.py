"""A toy dataset in DIS5K layout (thin wires, rings with holes), for smoke runs and tests.

    python -m training.synthetic /tmp/toy_dis --train 16 --val 4

writes /tmp/toy_dis/DIS-TR/{im,gt}/ and /tmp/toy_dis/DIS-VD/{im,gt}/ (JPEG images, PNG masks of varied sizes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_split(folder: Path, count: int, seed: int = 0, size_range: tuple[int, int] = (72, 112)) -> list[str]:
    """``count`` image/mask pairs: a filled ring (with a hole) plus 1-px wires on a noisy background."""
    rng = np.random.default_rng(seed)
    (folder / "im").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        width, height = (int(rng.integers(*size_range)) for _ in range(2))
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
        radius = min(width, height) * rng.uniform(0.2, 0.3)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        hole = radius * rng.uniform(0.25, 0.45)
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
        for _ in range(3):
            start, end = rng.uniform(0, [width, height]), rng.uniform(0, [width, height])
            draw.line([tuple(start), tuple(end)], fill=255, width=1)
        foreground = np.asarray(mask)[..., None] > 127
        background = rng.integers(0, 120, (height, width, 3))
        colour = rng.integers(150, 256, 3)
        image = np.where(foreground, colour, background).astype(np.uint8)
        name = f"toy_{seed}_{index:03d}"
        Image.fromarray(image).save(folder / "im" / f"{name}.jpg", quality=95)
        mask.save(folder / "gt" / f"{name}.png")
        names.append(name)
    return names


def make_dataset(root: Path, train: int = 8, val: int = 4, seed: int = 0) -> Path:
    make_split(root / "DIS-TR", train, seed)
    make_split(root / "DIS-VD", val, seed + 1)
    return root


def make_base_from(unet_config: dict, donor: Path, target: Path, seed: int = 0) -> Path:
    """An SD-Turbo-layout folder with a random plain UNet of ``unet_config`` and the donor's vae/, scheduler/
    and empty-prompt embedding (for tests with the tiny fixture)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffdis_core.hub import EMPTY_EMBED_FILE

    torch.manual_seed(seed)
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    UNet2DConditionModel.from_config(config).save_pretrained(target / "unet")
    for part in ("vae", "scheduler"):
        shutil.copytree(donor / part, target / part, dirs_exist_ok=True)
    shutil.copy(donor / EMPTY_EMBED_FILE, target / EMPTY_EMBED_FILE)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="dataset root to create")
    parser.add_argument("--train", type=int, default=16, help="training pairs (default 16)")
    parser.add_argument("--val", type=int, default=4, help="validation pairs (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_dataset(Path(args.output), args.train, args.val, args.seed)
    print(json.dumps({"dataset": str(root), "train": args.train, "val": args.val}))


if __name__ == "__main__":
    main()
