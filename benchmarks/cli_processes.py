"""Images per second of the command line with 1 and 2 processes (accelerate launch) on this machine.

Each configuration runs the real command (`python -m diffdis_core`, or `accelerate launch --multi_gpu
--num_processes 2 -m diffdis_core`) on a folder of images, twice: with N and with 2N images. The rate
is N / (t(2N) - t(N)) where t is the time the command reports after its model loaded (its summary
line), so start-up, loading and the first image's warm-up cancel out. Each run is repeated
(``--repeats``, the configurations taking turns) and the fastest kept: on a shared machine the others'
load only ever slows a run down.
One process uses all cores; under accelerate each process gets an even share of them
(``--num_cpu_threads_per_process``), so the comparison is fair on CPU.

    python benchmarks/cli_processes.py                       # the tiny test model at 512²
    python benchmarks/cli_processes.py --model mid --images 16
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = ROOT / "tests" / "fixtures" / "official_tiny"
# A mid-size random DiffDIS UNet (the SD-2.1 layout at a fifth of its width).
MID_UNET = {"block_out_channels": [64, 128, 256, 256], "attention_head_dim": [2, 4, 8, 8], "layers_per_block": 2}


def make_mid_model(target: Path) -> Path:
    """The tiny model folder with a mid-size random UNet (the tiny VAE and embedding kept)."""
    import json

    import torch

    from diffdis_core import DiffDISUNet

    shutil.copytree(TINY, target, ignore=shutil.ignore_patterns("inputs.*", "expected.*", "README.md"))
    config = json.loads((TINY / "unet" / "config.json").read_text())
    config.update(MID_UNET)
    torch.manual_seed(0)
    unet = DiffDISUNet.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    with torch.no_grad():
        for conv in [*unet.rgb_proj, *unet.rgb_proj1]:
            conv.weight.normal_(0, 1e-3)
    shutil.rmtree(target / "unet")
    unet.save_pretrained(target / "unet")
    return target


def make_images(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
    return folder


def run_cli(processes: int, inputs: Path, output: Path, model: Path, resolution: int) -> float:
    cores = os.cpu_count() or 1
    args = [str(inputs), "--output", str(output), "--model", str(model), "--base", "none",
            "--resolution", str(resolution), "--dtype", "fp32"]
    if processes == 1:
        command = [sys.executable, "-m", "diffdis_core", *args]
    else:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", str(max(1, cores // processes)), "-m", "diffdis_core", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    found = re.search(r" written, .*; ([0-9.]+) s", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--images", type=int, default=24, help="N (the runs use N and 2N images)")
    parser.add_argument("--size", type=int, default=512, help="image height (width 4/3 of it)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = TINY if args.model == "tiny" else make_mid_model(tmp / "mid_model")
        small = make_images(tmp / "n", args.images, args.size)
        large = make_images(tmp / "2n", 2 * args.images, args.size)
        print(f"{args.model} model, {args.size}x{args.size * 4 // 3} JPEGs at --resolution {args.resolution}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}")
        print("| processes | threads each | s for N | s for 2N | images/s |")
        print("|---:|---:|---:|---:|---:|")
        best: dict[tuple[int, str], float] = {}
        for _ in range(args.repeats):
            for processes in args.processes:
                for folder in (small, large):
                    out = tmp / f"out_{processes}_{folder.name}"
                    seconds = run_cli(processes, folder, out, model, args.resolution)
                    best[processes, folder.name] = min(seconds, best.get((processes, folder.name), seconds))
                    shutil.rmtree(out)
        for processes in args.processes:
            times = best[processes, "n"], best[processes, "2n"]
            rate = args.images / max(times[1] - times[0], 1e-9)
            threads = max(1, (os.cpu_count() or 1) // processes)
            print(f"| {processes} | {threads} | {times[0]:.1f} | {times[1]:.1f} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
