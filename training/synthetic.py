"""Everything a one-minute smoke run of training and evaluation needs, made on the spot, offline.

    python training/synthetic.py /tmp/diffdis_smoke

writes ``/tmp/diffdis_smoke/DIS5K/`` (a toy dataset in DIS5K layout: rings with holes and 1-px wires on
noisy backgrounds; DIS-TR and DIS-VD) and ``/tmp/diffdis_smoke/sd-turbo-tiny/`` (a randomly initialised
model in SD-Turbo's layout and architecture, at a tiny width: unet/, vae/, scheduler/ and the empty-prompt
embedding), then prints the train and evaluate commands to run on them. Nothing is downloaded; the
model learns nothing useful, it only exercises the whole path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python training/synthetic.py`: run as its package's module
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, in place of this folder
    runpy.run_module(f"{Path(__file__).resolve().parent.name}.synthetic", run_name="__main__", alter_sys=True)

import numpy as np
from PIL import Image, ImageDraw

# SD-Turbo's UNet and VAE architecture (block types, attention layout, latent channels) at a tiny width.
TINY_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": [2, 2, 4, 4], "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "only_cross_attention": False, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": True,
}
TINY_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 64, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
EMPTY_PROMPT_TOKENS = 2  # the unpadded empty prompt: start and end token


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
    """A toy dataset in DIS5K layout: ``root/DIS-TR`` and ``root/DIS-VD``, each with im/ and gt/."""
    make_split(root / "DIS-TR", train, seed)
    make_split(root / "DIS-VD", val, seed + 1)
    return root


def make_tiny_base(target: Path, seed: int = 0) -> Path:
    """A random model in SD-Turbo's folder layout (unet/, vae/, scheduler/, empty_text_embed.safetensors),
    tiny: training starts from it exactly as from SD-Turbo (``--pretrained target --base none``)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffdis_core.configs import SD_TURBO_SCHEDULER_CONFIG
    from diffdis_core.spec import EMPTY_EMBED_FILE
    from diffdis_core.text import save_empty_embedding

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        UNet2DConditionModel.from_config(TINY_UNET_CONFIG).save_pretrained(target / "unet")
        AutoencoderKL.from_config(TINY_VAE_CONFIG).save_pretrained(target / "vae")
        embed = torch.randn(1, EMPTY_PROMPT_TOKENS, TINY_UNET_CONFIG["cross_attention_dim"])
    finally:
        torch.random.set_rng_state(generator_state)
    DDPMScheduler.from_config(SD_TURBO_SCHEDULER_CONFIG).save_pretrained(target / "scheduler")
    save_empty_embedding(embed, target / EMPTY_EMBED_FILE)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder to create (DIS5K/ and sd-turbo-tiny/ go inside)")
    parser.add_argument("--train", type=int, default=16, help="training pairs (default 16)")
    parser.add_argument("--val", type=int, default=4, help="validation pairs (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the random model (default 0)")
    args = parser.parse_args(argv)
    if args.train < 2 or args.val < 1:
        parser.error("--train must be at least 2 and --val at least 1")
    root = Path(args.output)
    taken = [p for p in (root / "DIS5K", root / "sd-turbo-tiny") if p.exists()]
    if taken:
        print(f"error: {taken[0]} already exists; choose another folder", file=sys.stderr)
        return 2
    dataset = make_dataset(root / "DIS5K", args.train, args.val, args.seed)
    base = make_tiny_base(root / "sd-turbo-tiny", args.seed)
    if __package__ == "diffdis_training":  # installed: the commands pip made
        train, evaluate = "diffdis-train", "diffdis-evaluate"
    else:
        here = Path(__file__).resolve().parent
        train, evaluate = f"python {here / 'train.py'}", f"python {here / 'evaluate.py'}"
    print(f"toy dataset: {dataset} ({args.train} training, {args.val} validation pairs)\n"
          f"tiny SD-Turbo-like model: {base}\n\nnext:\n"
          f"  {train} --pretrained {base} --base none --dataset {dataset} --output {root / 'run'} "
          f"--resolution 64 --batch-size 2 --max-steps 20 --num-workers 0\n"
          f"  {evaluate} --model {root / 'run' / 'final'} --base none --dataset {dataset} --split DIS-VD "
          f"--resolution 256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
