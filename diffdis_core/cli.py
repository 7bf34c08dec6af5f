"""Command line: ``python -m diffdis_core INPUT... --output DIR`` writes RGBA cutouts.

Each input gives ``DIR/<stem>.png`` (the image with the predicted mask as alpha, at its displayed
size) and, when asked, ``<stem>_mask.png`` / ``<stem>_edge.png``. Unreadable files are reported in
one line each and skipped; the exit code is then 1. Inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from .errors import DiffDISError
from .spec import DEFAULT_BASE, DEFAULT_MODEL
from .image_io import IMAGE_EXTENSIONS

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffdis_core",
        description="Cut the foreground out of images with DiffDIS (one-step diffusion segmentation).")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder, UNet .safetensors file or Hugging Face repo id (default {DEFAULT_MODEL})")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="SD-Turbo folder or repo for parts the model lacks (VAE, text encoder); "
                             f"only read when needed; 'none' for no base (default {DEFAULT_BASE})")
    parser.add_argument("--output", "-o", required=True, help="folder for the results (created if missing)")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="processing resolution, a multiple of 8 (default 1024, as trained)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same mask")
    parser.add_argument("--device", default="auto", help="auto (CUDA, XPU, MPS, else CPU), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: fp16 on accelerators, fp32 on CPU")
    parser.add_argument("--tta", action="store_true",
                        help="the authors' flip x 3-scale test-time augmentation (6x slower)")
    parser.add_argument("--ensemble", type=int, default=1, help="average this many noise draws")
    parser.add_argument("--no-normalize", action="store_true", help="skip the authors' per-image min-max normalisation")
    parser.add_argument("--save-mask", action="store_true", help="also write <stem>_mask.png (8-bit)")
    parser.add_argument("--save-edge", action="store_true", help="also write <stem>_edge.png (decodes the edge too)")
    parser.add_argument("--overwrite", action="store_true", help="replace results that already exist in --output")
    parser.add_argument("--recursive", action="store_true", help="also look for images in subfolders")
    parser.add_argument("--low-memory", action="store_true",
                        help="on CPU, return freed memory to the system at once: about 20%% slower, "
                             "a quarter to half less peak memory")
    return parser


def collect_inputs(patterns: list[str], recursive: bool) -> tuple[list[Path], list[str]]:
    """Expand files, folders and globs into image paths (sorted, deduplicated); also return problems."""
    found: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            found.extend(sorted(p for p in walker if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(glob.glob(pattern, recursive=recursive))
            if matches:
                found.extend(Path(m) for m in matches if Path(m).is_file())
            else:
                problems.append(f"{pattern}: no such file, folder or matching images")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique, problems


def plan_outputs(inputs: list[Path], output: Path, args: argparse.Namespace
                 ) -> tuple[list[tuple[Path, dict[str, Path]]], list[str]]:
    """Output paths per input; refuse anything that would overwrite an input or another result."""
    suffixes = {"cutout": ""}
    if args.save_mask:
        suffixes["mask"] = "_mask"
    if args.save_edge:
        suffixes["edge"] = "_edge"
    input_set = set(inputs)
    taken: dict[Path, Path] = {}
    plan, problems = [], []
    for source in inputs:
        targets = {kind: (output / f"{source.stem}{suffix}.png").resolve() for kind, suffix in suffixes.items()}
        clash = next((t for t in targets.values() if t in input_set), None)
        if clash is not None:
            problems.append(f"{source}: its result {clash} would overwrite an input; choose another --output")
            continue
        twin = next((taken[t] for t in targets.values() if t in taken), None)
        if twin is not None:
            problems.append(f"{source}: same name as {twin}, whose result has the same file name; "
                            "run it with another --output")
            continue
        existing = [t for t in targets.values() if t.exists()]
        if existing and not args.overwrite:
            problems.append(f"{source}: {existing[0]} already exists; skipped (use --overwrite to replace)")
            continue
        taken.update({t: source for t in targets.values()})
        plan.append((source, targets))
    return plan, problems


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .devices import keep_freed_memory, pick_device, pick_dtype
    from .image_io import cutout, load_image, save_image, to_uint8
    from .pipeline import DiffDISPipeline

    if args.resolution < 8 or args.resolution % 8:
        raise DiffDISError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.ensemble < 1:
        raise DiffDISError(f"--ensemble must be at least 1, got {args.ensemble}")
    inputs, problems = collect_inputs(args.inputs, args.recursive)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise DiffDISError(f"--output {output} is a file; give a folder")
    plan, skipped = plan_outputs(inputs, output, args)
    problems += skipped
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    if not plan:
        print("nothing to do", file=sys.stderr)
        return EXIT_SOME_FAILED if problems or not inputs else EXIT_OK

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if device.type == "cpu" and not args.low_memory:
        keep_freed_memory()  # this process ends with the batch: trade memory return for ~20% speed
    base = None if args.base.lower() == "none" else args.base
    pipe = DiffDISPipeline.from_pretrained(args.model, base=base, torch_dtype=dtype, device=device)
    output.mkdir(parents=True, exist_ok=True)

    failures = len(problems)
    for source, targets in tqdm(plan, desc="DiffDIS", unit="image", disable=len(plan) < 2 and None):
        try:
            rgb = load_image(source)
        except DiffDISError as error:
            tqdm.write(f"skipped {error}", file=sys.stderr)
            failures += 1
            continue
        generator = torch.Generator("cpu").manual_seed(args.seed)
        result = pipe(rgb[None], processing_res=args.resolution, generator=generator, ensemble_size=args.ensemble,
                      tta=args.tta, decode_edge=args.save_edge, minmax=not args.no_normalize)
        mask = result.mask[0, 0]
        save_image(cutout(rgb, mask), targets["cutout"])
        if "mask" in targets:
            from PIL import Image
            save_image(Image.fromarray(to_uint8(mask), "L"), targets["mask"])
        if "edge" in targets:
            from PIL import Image
            save_image(Image.fromarray(to_uint8(result.edge[0, 0]), "L"), targets["edge"])
    done = len(plan) - (failures - len(problems))
    print(f"wrote {done} cutout(s) to {output}" + (f"; {failures} input(s) skipped" if failures else ""),
          file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DiffDISError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
