"""Score DiffDIS on DIS5K (or any im/ + gt/ folders) the way the paper does.

    python training/evaluate.py --model qianyu1217/diffdis --dataset /data/DIS5K
    python training/evaluate.py --model runs/dis/final --dataset /data/DIS5K --split DIS-VD --no-tta --json vd.json
    python training/evaluate.py --pred preds/DIS-VD --gt /data/DIS5K/DIS-VD/gt          # saved maps only
    accelerate launch --multi_gpu --num_processes 4 training/evaluate.py ...              # images split 4 ways

(``diffdis-evaluate`` once the package is installed.) Inference is the authors' run_inference.py by
default: PIL bilinear input resize to 1024², one step with a fixed noise seed per image, their flip ×
3-scale test-time augmentation, the map truncated to 8 bits and PIL-resized to the image's size, saved
as the 8-bit grey PNG their test_score.py reads. Scoring follows that script (see training/metrics.py):
maps binarised at 0.5, max F, weighted F, adaptive E, S and MAE (plus HCE). ``--soft`` scores the soft
maps instead. Under ``accelerate launch`` each image is done once, by one of the processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python training/evaluate.py`: run as its package's module
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, in place of this folder
    runpy.run_module(f"{Path(__file__).resolve().parent.name}.evaluate", run_name="__main__", alter_sys=True)

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffdis_core.commandline import OneLineErrorParser, base_option, number, run_main
from diffdis_core.devices import DTYPE_CHOICES
from diffdis_core.errors import DiffDISError
from diffdis_core.files import write_bytes_atomic
from diffdis_core.image_io import IMAGE_EXTENSIONS
from diffdis_core.spec import DEFAULT_BASE, DEFAULT_MODEL, DEFAULT_PROCESSING_RES, check_processing_res

from .data import DIS5K_SPLITS, Sample, find_pairs, load_mask, load_rgb, split_folder
from .metrics import DISMetrics, combine, format_table, mean_over_splits

TEST_SPLITS = ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"]
TEST_MEAN = "DIS-TE (1-4)"
PAPER_TABLE = {  # Table 2 of the paper (DiffDIS, 1024²)
    "DIS-VD": (0.908, 0.888, 0.948, 0.904, 0.029),
    "DIS-TE1": (0.883, 0.862, 0.933, 0.891, 0.030),
    "DIS-TE2": (0.917, 0.895, 0.951, 0.913, 0.026),
    "DIS-TE3": (0.934, 0.916, 0.964, 0.919, 0.025),
    "DIS-TE4": (0.909, 0.893, 0.955, 0.896, 0.032),
    TEST_MEAN: (0.911, 0.892, 0.950, 0.905, 0.028),
}


# ---------------------------------------------------------------------------------------------- inference
# The authors' run_inference.py, step by step: the image is read as 8-bit RGB and resized with PIL bilinear
# to processing_res²; the pipeline runs (with TTA: six views, each min-maxed, de-augmented, averaged); the
# averaged map goes to 8 bits with torchvision's to_pil (× 255, truncated) and back to the image's size with
# PIL bilinear; that 8-bit grey PNG is what their test_score.py reads.
def protocol_input(image, processing_res: int):
    """The authors' input: the (8-bit RGB) image resized with PIL bilinear to ``processing_res``²."""
    from PIL import Image

    return image.resize((processing_res, processing_res), Image.Resampling.BILINEAR)


def protocol_map(square: np.ndarray, size: tuple[int, int], bits: int = 8) -> np.ndarray:
    """A map at the processing size (float in [0, 1]) as the authors save it: × 255 truncated to 8 bits
    (``bits=16``: × 65535 truncated to 16 bits), then PIL bilinear to ``size`` = (width, height)."""
    from PIL import Image

    scale, dtype = (65535, np.uint16) if bits == 16 else (255, np.uint8)
    levels = (np.clip(np.asarray(square, np.float32), 0, 1) * scale).astype(dtype)  # truncation, as to_pil
    return np.asarray(Image.fromarray(levels).resize(tuple(size), Image.Resampling.BILINEAR))


def predict_maps(pipe, images: list, *, processing_res: int = 1024, tta: bool = True, seed: int = 0,
                 bits: int = 8, decode_edge: bool = False, latents=None
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The saved maps (mask, and edge with ``decode_edge``) of RGB PIL ``images``, by the authors' protocol.

    Each image has its own generator seeded with ``seed``: its maps do not depend on the other images
    in the batch, nor on the process it runs on. ``latents`` replays given initial noise (see the pipeline).
    """
    import torch

    squares = [protocol_input(image, processing_res) for image in images]
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in images]
    out = pipe(squares, processing_res=processing_res, generator=generators, tta=tta, decode_edge=decode_edge,
               latents=latents)

    def saved(maps) -> list[np.ndarray]:
        return [protocol_map(m.reshape(m.shape[-2:]).float().cpu().numpy(), image.size, bits)
                for m, image in zip(maps, images, strict=True)]

    return saved(out.mask), (saved(out.edge) if decode_edge else None)


class _EvalImages:
    """Loads (name, image, ground truth) in DataLoader workers while the model runs."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return sample.name, load_rgb(sample.image), np.asarray(load_mask(sample.mask))


def _as_list(batch):
    """Keep a batch as a list of (name, PIL image, mask): the images differ in size."""
    return batch


def predict_and_score(pipe, samples: list[Sample], *, processing_res: int = 1024, tta: bool = True, seed: int = 0,
                      batch_size: int = 1, binarize: bool = True, hce: bool = True, save_dir: Path | None = None,
                      save_edge: bool = False, bits: int = 8, num_workers: int = 2, progress: bool = True,
                      desc: str = "evaluate", autocast=None) -> dict:
    """Run ``pipe`` on this process's share of ``samples`` and score the maps the protocol saves; returns
    ``DISMetrics.partial()`` (combine the processes' with ``gather_partials``).

    The samples are split between the processes of an ``accelerate launch`` (each image once); with
    ``save_dir``, maps are written to ``save_dir/mask/<name>.png`` (and ``edge/`` with ``save_edge``).
    """
    import torch
    from tqdm.auto import tqdm

    from diffdis_core.distributed import process_state
    from diffdis_core.image_io import save_image

    with process_state().split_between_processes(list(samples)) as shard:
        shard = list(shard)
    metrics = DISMetrics(binarize=binarize, hce=hce)
    loader = torch.utils.data.DataLoader(_EvalImages(shard), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_as_list)
    with tqdm(total=len(shard), desc=desc, unit="image", disable=not progress, leave=False) as bar:
        for batch in loader:
            names, images, gts = zip(*batch, strict=True)
            with autocast() if autocast is not None else nullcontext():
                masks, edges = predict_maps(pipe, list(images), processing_res=processing_res, tta=tta, seed=seed,
                                            bits=bits, decode_edge=save_dir is not None and save_edge)
            for index, (name, mask, gt) in enumerate(zip(names, masks, gts, strict=True)):
                if save_dir is not None:
                    save_image(Image.fromarray(mask), save_dir / "mask" / f"{name}.png")
                    if edges is not None:
                        save_image(Image.fromarray(edges[index]), save_dir / "edge" / f"{name}.png")
                metrics.update(mask, gt)  # the saved map, as test_score.py reads it
                bar.update(1)
    return metrics.partial()


def gather_partials(partial: dict) -> list[dict]:
    """Every process's partial sums (a one-element list without distribution)."""
    from accelerate.utils import gather_object

    from diffdis_core.distributed import process_state

    if process_state().num_processes == 1:
        return [partial]
    return gather_object([partial])


# ---------------------------------------------------------------------------------------------- saved maps
def read_prediction(path: Path) -> np.ndarray:
    """A saved map as uint8 or uint16 (16-bit PNGs keep their precision)."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16") or image.mode == "I":
                return np.asarray(image).astype(np.uint16)
            if image.mode == "F":
                return np.asarray(image, dtype=np.float64)
            return np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DiffDISError(f"{path}: unreadable prediction ({error})") from None


def pair_predictions(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """(prediction, ground truth) by stem; a ground truth without a prediction is an error."""
    if not pred_dir.is_dir():
        raise DiffDISError(f"prediction folder {pred_dir} does not exist")
    if not gt_dir.is_dir():
        raise DiffDISError(f"ground-truth folder {gt_dir} does not exist")
    preds = {p.stem: p for p in sorted(pred_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    gts = {p.stem: p for p in sorted(gt_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not gts:
        raise DiffDISError(f"no masks in {gt_dir}")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise DiffDISError(f"{len(missing)} of {len(gts)} ground truths in {gt_dir} have no prediction in {pred_dir}, "
                           f"e.g. {', '.join(missing[:3])}; predictions are matched by file stem")
    return [(preds[stem], gts[stem]) for stem in sorted(gts)]


def score_saved(pairs: list[tuple[Path, Path]], binarize: bool, hce: bool, progress: bool, desc: str) -> dict:
    from tqdm.auto import tqdm

    metrics = DISMetrics(binarize=binarize, hce=hce)
    for pred_path, gt_path in tqdm(pairs, desc=desc, unit="image", disable=not progress, leave=False):
        metrics.update(read_prediction(pred_path), np.asarray(load_mask(gt_path)))
    return metrics.partial()


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description="Score a DiffDIS model (or saved predictions) on DIS5K with the paper's protocol.")
    source = parser.add_argument_group("what to score")
    source.add_argument("--model", default=None,
                        help=f"model folder (e.g. a training run's final/), UNet file or Hugging Face repo "
                             f"(default {DEFAULT_MODEL})")
    source.add_argument("--base", default=DEFAULT_BASE,
                        help=f"SD-Turbo folder or repo for parts the model lacks; 'none' for none "
                             f"(default {DEFAULT_BASE})")
    source.add_argument("--dataset", help="DIS5K root (with DIS-VD/, DIS-TE1/ ...) or a folder with im/ and gt/")
    source.add_argument("--split", nargs="+", default=None,
                        help=f"splits to score (default: {' '.join(DIS5K_SPLITS)})")
    source.add_argument("--pred", help="score saved predictions: a folder of maps (with --gt), or a folder with one "
                                       "subfolder per split (with --dataset); nothing is run")
    source.add_argument("--gt", help="ground-truth folder for --pred")
    infer = parser.add_argument_group("inference (the paper's settings by default)")
    infer.add_argument("--processing-res", "--resolution", dest="processing_res", type=number(int),
                       default=DEFAULT_PROCESSING_RES, help="processing size: a multiple of 64, of 256 with TTA "
                       f"(default {DEFAULT_PROCESSING_RES}; --resolution is the old name, still accepted)")
    infer.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                       help="the authors' flip x 3-scale test-time augmentation (default on, as in the paper)")
    infer.add_argument("--seed", type=number(int, 0), default=0,
                       help="noise seed, the same for every image (default 0)")
    infer.add_argument("--batch-size", type=number(int, 1), default=1, help="images per forward pass (default 1)")
    infer.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (accelerate launch: its own)")
    infer.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES,
                       help="model precision (default fp32, as the paper; auto: the fastest safe one)")
    infer.add_argument("--max-images", type=number(int, 1), default=None,
                       help="score only the first N images of each split")
    infer.add_argument("--num-workers", type=number(int, 0), default=2, help="image-loading workers (default 2)")
    infer.add_argument("--save-pred",
                       help="also write the maps to SAVE_PRED/<split>/mask/<stem>.png, the layout of the authors' "
                            "run_inference.py that their test_score.py reads")
    infer.add_argument("--save-edge", action="store_true",
                       help="with --save-pred, also write the edge maps to SAVE_PRED/<split>/edge/")
    infer.add_argument("--pred-bits", type=int, choices=[8, 16], default=8,
                       help="depth of the maps, saved and scored (default 8: 8-bit grey PNG, the authors' "
                            "protocol; 16 keeps finer levels, which their test_score.py cannot read)")
    infer.add_argument("--overwrite", action="store_true", help="replace maps already in --save-pred")
    score = parser.add_argument_group("scoring")
    score.add_argument("--soft", action="store_true",
                       help="score the soft maps (no binarisation; mean E-measure) instead of the authors' protocol")
    score.add_argument("--no-hce", action="store_true", help="skip human correction effort (the slowest metric)")
    score.add_argument("--json", help="write the figures here: {split: {Fmax, Fw, Em, Sm, MAE, HCE, images}}")
    score.add_argument("--compare-paper", action="store_true", help="also print the paper's Table 2 figures")
    return parser


def resolve_splits(dataset: str, splits: list[str] | None) -> list[tuple[str, Path]]:
    root = Path(dataset)
    if (root / "im").is_dir() and (root / "gt").is_dir():
        if splits:
            raise DiffDISError(f"{root} is a single im/ + gt/ folder; --split only applies to a DIS5K root")
        return [(root.resolve().name, root)]
    return [(name, split_folder(root, name)) for name in (splits or DIS5K_SPLITS)]


def run(args: argparse.Namespace) -> dict[str, dict]:
    binarize, hce = not args.soft, not args.no_hce
    if args.pred:
        if args.model:
            raise DiffDISError("give either --model (run inference) or --pred (score saved maps), not both")
        if args.gt:
            if args.dataset or args.split:
                raise DiffDISError("--pred with --gt scores one folder pair; leave out --dataset and --split")
            jobs = [(Path(args.pred).resolve().name, pair_predictions(Path(args.pred), Path(args.gt)))]
        elif args.dataset:
            jobs = []
            for name, folder in resolve_splits(args.dataset, args.split):
                pred = Path(args.pred) / name
                pred = pred / "mask" if (pred / "mask").is_dir() else pred  # the authors' <split>/mask/ layout
                jobs.append((name, pair_predictions(pred, folder / "gt")))
        else:
            raise DiffDISError("--pred needs --gt (one folder pair) or --dataset (one subfolder per split)")
        from diffdis_core.distributed import process_state

        state = process_state(cpu=True)  # scoring runs on the CPU; under accelerate launch it is shared out
        results = {}
        for name, pairs in jobs:
            pairs = pairs[: args.max_images] if args.max_images else pairs
            with state.split_between_processes(pairs) as shard:
                partial = score_saved(list(shard), binarize, hce, state.is_main_process, name)
            results[name] = combine(gather_partials(partial))
        return results

    check_processing_res(args.processing_res, tta=args.tta, name="--processing-res")
    if args.gt:
        raise DiffDISError("--gt is only used with --pred")
    if not args.dataset:
        raise DiffDISError("give --dataset (a DIS5K root or an im/ + gt/ folder) to evaluate a model on")
    if args.save_edge and not args.save_pred:
        raise DiffDISError("--save-edge needs --save-pred (the folder to write the maps to)")
    splits = [(name, folder, find_pairs(folder)) for name, folder in resolve_splits(args.dataset, args.split)]
    splits = [(name, folder, samples[: args.max_images] if args.max_images else samples)
              for name, folder, samples in splits]
    save_root = Path(args.save_pred) if args.save_pred else None
    if save_root is not None and not args.overwrite:
        for name, _, samples in splits:
            kinds = ["mask", "edge"] if args.save_edge else ["mask"]
            existing = [save_root / name / kind / f"{s.name}.png" for s in samples for kind in kinds
                        if (save_root / name / kind / f"{s.name}.png").exists()]
            if existing:
                raise DiffDISError(f"{existing[0].parent} already has {len(existing)} of these maps "
                                   f"(e.g. {existing[0].name}); pass --overwrite to replace them or choose another "
                                   "--save-pred")

    import torch

    from diffdis_core import DiffDISPipeline
    from diffdis_core.devices import pick_dtype
    from diffdis_core.distributed import process_device, process_state

    # Under accelerate launch the images are split between the processes (GPUs, or CPU processes where
    # there is no GPU), each image done once by one of them.
    _, device = process_device(args.device)
    state = process_state(cpu=args.device == "cpu")
    dtype = pick_dtype(args.dtype, device)
    if save_root is not None:
        for name, _, _ in splits:
            for kind in ["mask", "edge"] if args.save_edge else ["mask"]:
                try:
                    (save_root / name / kind).mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise DiffDISError(f"cannot create {save_root / name / kind} ({error.strerror})") from None
    pipe = DiffDISPipeline.from_pretrained(args.model or DEFAULT_MODEL, base=base_option(args.base), torch_dtype=dtype,
                                           device=device)
    if state.is_main_process:
        print(f"model {args.model or DEFAULT_MODEL}: {args.processing_res}², one step, TTA {'on' if args.tta else 'off'}, "
              f"seed {args.seed}, {str(dtype).removeprefix('torch.')}, {args.pred_bits}-bit maps, "
              f"{'soft maps' if args.soft else 'binarised maps (authors protocol)'}, "
              f"{state.num_processes} process(es) on {device}", file=sys.stderr)
    results = {}
    for name, _, samples in splits:
        with torch.inference_mode():
            partial = predict_and_score(
                pipe, samples, processing_res=args.processing_res, tta=args.tta, seed=args.seed,
                batch_size=args.batch_size, binarize=binarize, hce=hce,
                save_dir=save_root / name if save_root is not None else None, save_edge=args.save_edge,
                bits=args.pred_bits, num_workers=args.num_workers, progress=state.is_main_process, desc=name)
        results[name] = combine(gather_partials(partial))
    return results


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    if all(s in results for s in TEST_SPLITS):
        results[TEST_MEAN] = mean_over_splits(results, TEST_SPLITS)
    print(format_table(results, soft=args.soft))
    if args.compare_paper:
        paper = {name: dict(zip(("Fmax", "Fw", "Em", "Sm", "MAE"), PAPER_TABLE[name], strict=True))
                 for name in results if name in PAPER_TABLE}
        if paper:
            print("\npaper (Table 2):")
            print(format_table(paper))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = {name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                 for name, r in results.items()}
        write_bytes_atomic(path, (json.dumps(clean, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def evaluate() -> int:
        results = run(args)
        from diffdis_core.distributed import process_state

        if process_state().is_main_process:
            report(results, args)
        return 0

    return run_main(evaluate)


if __name__ == "__main__":
    sys.exit(main())
