"""Command line: ``diffdis INPUT... --output DIR`` (or ``python -m diffdis_core``) writes RGBA cutouts.

Each input gives ``DIR/<name>.png`` (the image with the predicted mask as alpha, at its displayed
size) and, when asked, ``<name>_mask.png`` / ``<name>_edge.png``; folders searched with ``--recursive``
are mirrored under DIR. Runs are resumable: results already in DIR are kept and counted as done, and
missing extras are added. A problem with one input is one line naming it; the others go on, and the
exit code is 1. Under ``accelerate launch`` the inputs are shared between the processes. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DiffDISError
from .image_io import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_PATH_BYTES_PER_PIXEL, IMAGE_EXTENSIONS,
                       available_memory, default_max_pixels)
from .spec import DEFAULT_BASE, DEFAULT_MODEL, DEFAULT_PROCESSING_RES

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
SUFFIXES = {"cutout": "", "mask": "_mask", "edge": "_edge"}
ALPHA_IS_MASK, ALPHA_TIMES_INPUT = "mask", "mask x input alpha"
GLOB_CHARS = set("*?[")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffdis",
        description="Cut the foreground out of images with DiffDIS (one-step diffusion segmentation). "
                    "Re-running a command resumes it: finished results are kept.",
        epilog="Several GPUs or machines: accelerate launch --multi_gpu --num_processes N -m diffdis_core ... "
               "(each image is done once, by one process). Docs: docs/cli.md")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders or glob patterns ('**' matches any depth)")
    parser.add_argument("--output", "-o", required=True, help="folder for the results (created if missing)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder, UNet .safetensors file or Hugging Face repo id (default {DEFAULT_MODEL})")
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help="SD-Turbo folder or repo for parts the model lacks (VAE, text encoder); "
                             f"only read when needed; 'none' for no base (default {DEFAULT_BASE})")
    # --resolution and --ensemble: the names before the pipeline's, kept for existing scripts.
    parser.add_argument("--processing-res", "--resolution", dest="processing_res", type=int,
                        default=DEFAULT_PROCESSING_RES,
                        help="the side of the square the model sees, a multiple of 64, of 256 with --tta "
                             f"(default {DEFAULT_PROCESSING_RES}, as trained)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same mask")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, XPU, MPS, else CPU), cpu, cuda, cuda:1, mps; under accelerate launch: "
                             "auto (each process its own GPU) or cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 where the hardware computes it natively (recent GPUs and CPUs), "
                             "else fp16 on GPUs and fp32 on CPUs")
    parser.add_argument("--tta", action="store_true",
                        help="the authors' flip x 3-scale test-time augmentation (6x slower)")
    parser.add_argument("--ensemble-size", "--ensemble", dest="ensemble_size", type=int, default=1,
                        help="combine this many noise draws (the authors' aligned median)")
    parser.add_argument("--no-normalize", action="store_true", help="skip the authors' per-image min-max normalisation")
    parser.add_argument("--save-mask", action="store_true", help="also write <name>_mask.png (8-bit)")
    parser.add_argument("--save-edge", action="store_true", help="also write <name>_edge.png (decodes the edge too)")
    parser.add_argument("--no-refine-edges", action="store_true",
                        help="enlarge the mask bilinearly instead of along the image's edges (images larger "
                             "than --processing-res; default: refined, sharper hair and wires)")
    parser.add_argument("--no-refine-foreground", action="store_true",
                        help="keep the image's own colours where the mask is soft (default: the foreground's "
                             "colours are estimated there, so no fringe of the old background shows)")
    parser.add_argument("--keep-input-alpha", action="store_true",
                        help="multiply an input's own transparency into the cutout's alpha (default: the cutout's "
                             "alpha is the predicted mask; the input's alpha is ignored)")
    parser.add_argument("--overwrite", action="store_true", help="redo and replace results that already exist")
    parser.add_argument("--recursive", action="store_true",
                        help="also search subfolders of folder inputs; the results mirror the folder tree")
    parser.add_argument("--max-megapixels", type=float, default=None,
                        help="refuse larger images (0: no limit). Default: what the memory available once the "
                             f"model is loaded holds at {DEFAULT_PATH_BYTES_PER_PIXEL} bytes a pixel, the peak of "
                             "the default refinements (fewer with --no-refine-foreground or --no-refine-edges); "
                             f"{DEFAULT_MAX_MEGAPIXELS} where that memory cannot be read")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and VAE: the first image of each size compiles (minutes), "
                             "later ones run faster; for long batches on a GPU (needs Triton there)")
    parser.add_argument("--low-memory", action="store_true",
                        help="on CPU, return freed memory to the system at once: about 20%% slower, "
                             "a quarter to half less peak memory")
    return parser


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Job:
    source: Path  # the image file
    name: Path  # its results' path under --output, without suffix (mirrors the folder it was found in)


@dataclass
class Inputs:
    jobs: list[Job] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # inputs that will not be processed: exit code 1
    notes: list[str] = field(default_factory=list)  # things passed over on purpose (named, not failures)


def _folder_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: Path, depth: int | None, hidden: bool, exclude: set, found: Inputs) -> Iterator[Path]:
    """Files under ``root``, at most ``depth`` folders down (None: any depth). Symbolic links to folders
    are followed, but never into a folder already searched, so link loops end."""
    seen = {_folder_key(root)}
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            found.failures.append(f"{folder}: cannot list it ({error.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") and not hidden:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                yield path  # files, and broken links (reported by the caller)
                continue
            if depth is not None and level >= depth:
                continue
            key = _folder_key(path)
            if key in exclude:
                continue
            if key in seen:
                if entry.is_symlink():
                    found.notes.append(f"not following {path}: it links back to a folder already searched")
                continue
            seen.add(key)
            stack.append((path, level + 1))


def _match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Path components against pattern components; '**' matches any number of folders."""
    from fnmatch import fnmatchcase

    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return bool(parts) and (not parts[0].startswith(".") or pattern[0].startswith(".")) \
        and fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def collect_inputs(arguments: list[str], recursive: bool, output: Path | None = None) -> Inputs:
    """Expand files, folders and glob patterns into jobs (deduplicated, in argument order, sorted within
    one), naming every input that will not be processed."""
    from .image_io import result_info

    found = Inputs()
    exclude = {_folder_key(output)} if output is not None and output.is_dir() else set()
    output_real = os.path.realpath(output) if output is not None else None
    seen: set[str] = set()
    own_results = 0
    for argument in arguments:
        path = Path(argument)
        candidates: list[tuple[Path, Path]] = []  # (file, root its result name is relative to)
        explicit = False
        if path.is_dir():
            candidates = [(p, path) for p in _walk(path, None if recursive else 0, False, exclude, found)]
        elif path.exists():
            candidates, explicit = [(path, path.parent)], True
        elif os.path.lexists(path):
            found.failures.append(f"{argument}: broken symbolic link (it points to {os.readlink(path)})")
            continue
        elif GLOB_CHARS & set(argument):
            parts = path.parts
            fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
            root, pattern = Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:]
            depth = None if "**" in pattern else len(pattern) - 1
            hidden = any(p.startswith(".") for p in pattern)
            walked = _walk(root, depth, hidden, exclude, found) if root.is_dir() else []
            candidates = [(p, root) for p in walked if _match(p.relative_to(root).parts, pattern)]
            if not candidates:
                found.failures.append(f"{argument}: no matching files")
                continue
        else:
            found.failures.append(f"{argument}: no such file or folder")
            continue
        jobs, ignored, images = [], [], 0
        for file, root in sorted(candidates, key=lambda c: c[0].relative_to(c[1]).as_posix()):
            if not explicit and file.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(file.name)
                continue
            images += 1
            if not os.path.exists(file):
                found.failures.append(f"{file}: broken symbolic link (it points to {os.readlink(file)})")
                continue
            real = os.path.realpath(file)
            if real in seen:
                continue
            if not explicit and output_real is not None and real.startswith(output_real + os.sep) \
                    and result_info(file) is not None:
                own_results += 1  # a result of an earlier run in the output folder, not an input
                continue
            seen.add(real)
            jobs.append(Job(file, file.relative_to(root).with_suffix("")))
        if ignored:
            shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            found.notes.append(f"{argument}: ignored {len(ignored)} file(s) without an image extension ({shown})")
        if not images and path.is_dir():
            found.failures.append(f"{argument}: no images in this folder"
                                  + ("" if recursive else " (--recursive searches its subfolders)"))
        found.jobs += jobs
    if own_results:
        found.notes.append(f"passed over {own_results} result(s) of earlier runs found among the inputs")
    return found


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Task:
    job: Job
    targets: dict[str, Path]  # kind (cutout, mask, edge) -> result file
    kinds: tuple[str, ...] = ()  # the results to make with the model
    mask_from_cutout: bool = False  # the missing mask is the finished cutout's alpha
    other_settings: bool = False

    @property
    def done(self) -> bool:
        return not self.kinds and not self.mask_from_cutout


def plan_tasks(inputs: Inputs, output: Path, kinds: list[str]) -> list[Task]:
    """Result paths per job; a job whose results would overwrite an input or another job's results is
    a failure (named in ``inputs.failures``)."""
    input_paths = {os.path.realpath(job.source) for job in inputs.jobs}
    output_real = os.path.realpath(output)
    owner: dict[str, Job] = {}
    tasks = []
    for job in inputs.jobs:
        targets = {kind: output / job.name.parent / f"{job.name.name}{SUFFIXES[kind]}.png" for kind in kinds}
        real = {kind: os.path.join(output_real, os.path.relpath(t, output)) for kind, t in targets.items()}
        clash = next((targets[k] for k, r in real.items() if r in input_paths), None)
        if clash is not None:
            inputs.failures.append(f"{job.source}: its result {clash} would overwrite an input; "
                                   "choose another --output")
            continue
        twin = next((owner[r] for r in real.values() if r in owner), None)
        if twin is not None:
            inputs.failures.append(f"{job.source}: its result name is taken by {twin.source}; "
                                   "run it with another --output")
            continue
        owner.update({r: job for r in real.values()})
        tasks.append(Task(job, targets))
    return tasks


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a result depends on, stored in it (a resumed run with other settings is pointed out)."""
    # The keys are the results' stored format (older results compare equal): not renamed with the options.
    return {"model": args.model, "base": args.base, "resolution": args.processing_res, "seed": args.seed,
            "tta": args.tta, "ensemble": args.ensemble_size, "normalize": not args.no_normalize,
            "refine_edges": not args.no_refine_edges, "refine_foreground": not args.no_refine_foreground}


def classify(task: Task, overwrite: bool, settings: dict[str, Any]) -> None:
    """Decide what ``task`` needs from the results already there: nothing, the mask from the cutout's
    alpha, and/or a model run writing only the missing results. Raises DiffDISError for a file in the
    way that DiffDIS did not write."""
    from .image_io import result_info

    if overwrite:
        task.kinds = tuple(task.targets)
        return
    infos = {}
    for kind, target in task.targets.items():
        if not os.path.lexists(target):
            continue
        info = result_info(target)
        if info is None or info.get("kind") != kind:
            raise DiffDISError(f"{target} exists and is not a DiffDIS {kind}; use --overwrite to replace it, "
                               "or another --output")
        infos[kind] = info
    task.other_settings = any(info.get("settings") != settings for info in infos.values())
    missing = tuple(kind for kind in task.targets if kind not in infos)
    # The same numbers as the cutout's alpha, at no cost (a new run may differ in the last bit).
    task.mask_from_cutout = "mask" in missing and infos.get("cutout", {}).get("alpha") == ALPHA_IS_MASK
    task.kinds = tuple(kind for kind in missing if not (kind == "mask" and task.mask_from_cutout))


# ---------------------------------------------------------------------------------------------- work
def prepare_output(output: Path) -> None:
    """Create the output folder and check it takes files, before any model loads."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [output, *output.parents] if p.exists() and not p.is_dir()), output)
        raise DiffDISError(f"--output {output}: {blocker} is a file, not a folder; give another --output") from None
    except OSError as error:
        raise DiffDISError(f"--output {output}: cannot create it ({error.strerror})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=output, prefix=".diffdis-write-test-"):
            pass
    except OSError as error:
        raise DiffDISError(f"--output {output}: cannot write there ({error.strerror})") from None


def describe_failure(error: BaseException, source: Path) -> str:
    """One line naming the input and what went wrong."""
    if isinstance(error, DiffDISError):
        reason = str(error)
    elif isinstance(error, OSError) and error.strerror:
        reason = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    elif isinstance(error, MemoryError):
        reason = "out of memory (a smaller --resolution or --max-megapixels helps)"
    else:
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0] if text else 'no details'}"
    prefix = f"{source}: "
    return f"failed {source}: {reason[len(prefix):] if reason.startswith(prefix) else reason}"


class Worker:
    """Runs one task: loads the image, runs the pipeline, writes the results it lacks."""

    def __init__(self, pipe: Any, args: argparse.Namespace, settings: dict[str, Any]):
        self.pipe, self.args, self.settings = pipe, args, settings
        if args.max_megapixels is None:  # measured here, with the model loaded
            self.max_pixels = default_max_pixels(available_memory())
        else:
            self.max_pixels = int(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None

    def __call__(self, task: Task) -> None:
        for target in task.targets.values():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DiffDISError(f"cannot create the folder {target.parent} ({error.strerror})") from None
        if task.mask_from_cutout:
            self._derive_mask(task)
        if task.kinds:
            self._run(task)

    def _save(self, image: Any, task: Task, kind: str, **info: Any) -> None:
        from .image_io import save_image

        target = task.targets[kind]
        try:
            save_image(image, target, {"kind": kind, "settings": self.settings, **info})
        except OSError as error:
            raise DiffDISError(f"cannot write {target} ({error.strerror or error})") from None

    def _derive_mask(self, task: Task) -> None:
        from PIL import Image

        with Image.open(task.targets["cutout"]) as cutout:
            self._save(cutout.getchannel("A"), task, "mask")

    def _run(self, task: Task) -> None:
        import torch
        from PIL import Image

        from .cutout import cutout_rgba
        from .image_io import map_to_uint8, multiply_alpha, open_image

        args = self.args
        image = open_image(task.job.source, self.max_pixels)
        generator = torch.Generator("cpu").manual_seed(args.seed)  # the result depends on image and seed only
        # The 8-bit view goes in as is (the pipeline resizes it without a float copy); the maps come
        # back at the processing size and the cutout brings them to full size, in 8 bits.
        result = self.pipe(image.rgb()[None], processing_res=args.processing_res, generator=generator,
                           ensemble_size=args.ensemble_size, tta=args.tta, decode_edge="edge" in task.kinds,
                           minmax=not args.no_normalize, output_size=False)
        refine_foreground = "cutout" in task.kinds and not args.no_refine_foreground
        colours, alpha = cutout_rgba(image.rgb()[None], result.mask.float().cpu(),
                                     refine_edges=not args.no_refine_edges, refine_foreground=refine_foreground,
                                     as_uint8=True)
        mask = alpha[0, 0].numpy()
        if refine_foreground:  # the subject's own colours where the mask is soft (no fringe of the old background)
            image.rgba[..., :3] = colours[0].permute(1, 2, 0).numpy()
        if "mask" in task.kinds:
            self._save(Image.fromarray(mask, "L"), task, "mask")
        if "edge" in task.kinds:
            self._save(Image.fromarray(map_to_uint8(result.edge[0], image.size), "L"), task, "edge")
        if "cutout" in task.kinds:
            keep = args.keep_input_alpha and image.has_alpha
            image.rgba[..., 3] = multiply_alpha(mask, image.rgba[..., 3]) if keep else mask
            self._save(Image.fromarray(image.rgba, "RGBA"), task, "cutout",
                       alpha=ALPHA_TIMES_INPUT if keep else ALPHA_IS_MASK)


def load_pipeline(args: argparse.Namespace, device: Any) -> Any:
    from .devices import pick_dtype
    from .hub import option_names
    from .pipeline import DiffDISPipeline

    base = None if args.base.lower() == "none" else args.base
    with option_names(model="--model ", base="--base "):
        return DiffDISPipeline.from_pretrained(args.model, base=base, torch_dtype=pick_dtype(args.dtype, device),
                                               device=device, compile=args.compile)


def run(args: argparse.Namespace) -> int:
    from .spec import check_processing_res

    # Before any model loads, under the option's name (the pipeline's check_inputs checks them again).
    check_processing_res(args.processing_res, tta=args.tta, name="--processing-res")
    if args.ensemble_size < 1:
        raise DiffDISError(f"--ensemble-size must be at least 1, got {args.ensemble_size}")
    if args.max_megapixels is not None and args.max_megapixels < 0:
        raise DiffDISError(f"--max-megapixels must be 0 (no limit) or more, got {args.max_megapixels:g}")
    output = Path(os.path.expanduser(args.output))
    prepare_output(output)

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the pixel budget is --max-megapixels, checked from each header

    state = _process_state(args)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    say = _printer(is_main)

    inputs = collect_inputs(args.inputs, args.recursive, output)
    kinds = ["cutout"] + (["mask"] if args.save_mask else []) + (["edge"] if args.save_edge else [])
    tasks = plan_tasks(inputs, output, kinds)
    if is_main:
        for line in inputs.failures:
            say(f"skipped {line}")
        for line in inputs.notes:
            say(f"note: {line}")
    # Each process takes every world-th task: shares stay even when a resumed run finds a prefix done.
    mine = tasks[rank::world]
    settings = settings_of(args)
    counts = {"written": 0, "done": 0, "failed": len(inputs.failures) if is_main else 0, "other_settings": 0}
    todo = []
    for task in mine:
        try:
            classify(task, args.overwrite, settings)
        except DiffDISError as error:
            say(describe_failure(error, task.job.source), always=True)
            counts["failed"] += 1
            continue
        counts["other_settings"] += task.other_settings
        if task.done:
            counts["done"] += 1
        else:
            todo.append(task)

    started = None
    if any(_gather(state, [bool(todo)])):
        pipe = _load_on_each(state, args, any(task.kinds for task in todo))
        worker = Worker(pipe, args, settings)
        started = time.perf_counter()
        for task in _progress(todo, is_main, world):
            try:
                worker(task)
                counts["written"] += 1
            except Exception as error:  # any per-image failure: one line, the batch goes on
                say(describe_failure(error, task.job.source), always=True)
                counts["failed"] += 1

    total = {key: sum(c[key] for c in _gather(state, [counts])) for key in counts}
    if state is not None:
        state.destroy_process_group()  # together, so no process exits while another still talks to it
    elapsed = time.perf_counter() - started if started is not None else 0.0  # after the model loaded
    if is_main:
        rate = f", {total['written'] / elapsed:.2f} images/s" if total["written"] and elapsed > 0 else ""
        summary = f"{total['written']} written, {total['done']} already done, {total['failed']} failed"
        if not total["written"] and not total["failed"] and total["done"]:
            summary += ": all inputs were already done"
        elif not (total["written"] or total["failed"] or total["done"]):
            summary += ": no inputs"
        say(f"{summary} ({output}; {elapsed:.1f} s{rate})")
        if total["other_settings"]:
            say(f"note: {total['other_settings']} existing result(s) were made with other settings (model, "
                "resolution, seed, ...); --overwrite redoes them")
    return EXIT_SOME_FAILED if total["failed"] or not (total["written"] or total["done"]) else EXIT_OK


# ---------------------------------------------------------------------------------------------- processes
def _process_state(args: argparse.Namespace) -> Any:
    """accelerate's process state under a multi-process launch, else None (one process, no accelerate)."""
    from .distributed import launched_world_size, process_state

    if launched_world_size() <= 1:
        return None
    if args.device not in ("auto", "cpu"):
        raise DiffDISError(f"--device {args.device}: under accelerate launch each process takes its own device; "
                           "use --device auto (or cpu)")
    return process_state(cpu=args.device == "cpu")


def _gather(state: Any, items: list) -> list:
    if state is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _load_on_each(state: Any, args: argparse.Namespace, needed: bool) -> Any:
    """The pipeline on this process's device; under a launch the main process loads (downloads) first."""
    from .devices import keep_freed_memory, pick_device

    device = pick_device(args.device) if state is None else state.device
    if device.type == "cpu" and not args.low_memory:
        keep_freed_memory()  # this process ends with the batch: trade memory return for ~20% speed
    if state is None:
        return load_pipeline(args, device) if needed else None
    pipe = load_pipeline(args, device) if needed and state.is_main_process else None
    state.wait_for_everyone()
    if needed and not state.is_main_process:
        pipe = load_pipeline(args, device)
    return pipe


def _progress(todo: list[Task], is_main: bool, world: int) -> Any:
    from tqdm.auto import tqdm

    if not is_main:
        return todo
    desc = "DiffDIS" if world == 1 else f"DiffDIS (process 1 of {world})"
    return tqdm(todo, desc=desc, unit="image", disable=True if len(todo) < 2 else None)


def _printer(is_main: bool) -> Any:
    from tqdm.auto import tqdm

    def say(line: str, always: bool = False) -> None:
        if is_main:
            tqdm.write(line, file=sys.stderr)
        elif always:
            print(line, file=sys.stderr, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DiffDISError as error:
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch, once (every process meets it)
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
