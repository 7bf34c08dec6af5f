"""Command line: ``diffdis INPUT... --output DIR`` (or ``python -m diffdis_core``) writes RGBA cutouts.

Each input gives ``DIR/<name>.png`` (the image with the predicted mask as alpha, at its displayed
size) and, when asked, ``<name>_mask.png`` / ``<name>_edge.png``; folders searched with ``--recursive``
are mirrored under DIR. Runs are resumable: a result already in DIR is kept and counted as done when it
was made from the same input with the same settings and reads back whole (else it is redone), and
missing extras are added. A problem with one input is one line naming it; the others go on, and the
exit code is 1. Under ``accelerate launch`` the inputs are shared between the processes. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commandline import EXIT_OK, EXIT_SOME_FAILED, OneLineErrorParser, base_option, number, run_main
from .errors import DiffDISError
from .image_io import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_PATH_BYTES_PER_PIXEL, IMAGE_EXTENSIONS,
                       available_memory, default_max_pixels)
from .spec import DEFAULT_BASE, DEFAULT_MODEL, DEFAULT_PROCESSING_RES

SUFFIXES = {"cutout": "", "mask": "_mask", "edge": "_edge"}
ALPHA_IS_MASK, ALPHA_TIMES_INPUT = "mask", "mask x input alpha"
GLOB_CHARS = set("*?[")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
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
    parser.add_argument("--base", default=DEFAULT_BASE, type=base_option,
                        help="SD-Turbo folder or repo for parts the model lacks (VAE, text encoder); "
                             f"only read when needed; 'none' for no base (default {DEFAULT_BASE})")
    # --resolution and --ensemble: the names before the pipeline's, kept for existing scripts.
    parser.add_argument("--processing-res", "--resolution", dest="processing_res", type=int,
                        default=DEFAULT_PROCESSING_RES,
                        help="the side of the square the model sees, a multiple of 64, of 256 with --tta "
                             f"(default {DEFAULT_PROCESSING_RES}, as trained)")
    parser.add_argument("--seed", type=number(int, -2**63, 2**64 - 1), default=0,  # what torch's generator takes
                        help="noise seed; the same seed gives the same mask")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, XPU, MPS, else CPU), cpu, cuda, cuda:1, mps; under accelerate launch: "
                             "auto (each process its own GPU) or cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 where the hardware computes it natively (recent GPUs and CPUs), "
                             "else fp16 on GPUs and fp32 on CPUs")
    parser.add_argument("--tta", action="store_true",
                        help="the authors' flip x 3-scale test-time augmentation (6x slower)")
    parser.add_argument("--ensemble-size", "--ensemble", dest="ensemble_size", type=number(int, 1), default=1,
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
    parser.add_argument("--overwrite", action="store_true",
                        help="redo and replace results that already exist, also ones DiffDIS did not write "
                             "(never an input)")
    parser.add_argument("--recursive", action="store_true",
                        help="also search subfolders of folder inputs; the results mirror the folder tree")
    parser.add_argument("--max-megapixels", type=number(float, 0), default=None,
                        help="refuse larger images (0: no limit). Default: what the memory available once the "
                             f"model is loaded holds at {DEFAULT_PATH_BYTES_PER_PIXEL} bytes a pixel, the peak of "
                             "the default refinements (fewer with --no-refine-foreground or --no-refine-edges); "
                             f"{DEFAULT_MAX_MEGAPIXELS} where that memory cannot be read")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet and VAE: the first image of each size compiles (minutes), "
                             "later ones run faster; for long batches on a GPU (needs Triton there)")
    # Kept for old scripts, without effect: every run now returns freed memory at each stage's end.
    parser.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
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


NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file (None: it is a regular file). A FIFO or device is
    never opened: reading one can block forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (it points to {os.readlink(path)})"
        return "no such file"
    except OSError as error:
        return f"cannot read it ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")
    return f"{kind}, not an image file"


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
            real = os.path.realpath(file)
            if real in seen:
                continue
            problem = _not_a_file(file)
            if problem is not None:
                seen.add(real)  # named once, however many arguments reach it
                found.failures.append(f"{file}: {problem}")
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
SAME, CHANGED, OTHER = "same", "changed", "other"
# Why an existing result is redone, most telling first (a task counts once, for its first reason).
REDO_REASONS = ("by --overwrite", "input changed", "other settings", "result incomplete", "made by an older version")


@dataclass
class Source:
    """The input a result is made from, as the result records it (``"input"`` in its metadata): the
    resolved path, size, modification time and SHA-256 of the content. A result matches its input the
    way rsync decides a file is up to date: same path, size and time, else the same content."""

    path: str
    size: int
    mtime_ns: int
    digest: str | None = None  # hashed when first needed

    @classmethod
    def of(cls, file: Path, known: Source | None = None) -> Source:
        """``file`` now; ``known``'s digest is reused when path, size and time are unchanged."""
        problem = _not_a_file(file)
        if problem is not None:
            raise DiffDISError(f"{file}: {problem}")
        status = os.stat(file)
        source = cls(os.path.realpath(file), status.st_size, status.st_mtime_ns)
        if known is not None and (known.path, known.size, known.mtime_ns) == (source.path, source.size,
                                                                               source.mtime_ns):
            source.digest = known.digest
        return source

    def sha256(self) -> str:
        if self.digest is None:
            digest = hashlib.sha256()
            try:
                # Not blocking: a FIFO swapped in since the check reads as empty instead of hanging.
                descriptor = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
                with os.fdopen(descriptor, "rb") as stream:
                    for block in iter(lambda: stream.read(1 << 20), b""):
                        digest.update(block)
            except OSError as error:
                raise DiffDISError(f"{self.path}: cannot read it ({error.strerror or error})") from None
            self.digest = digest.hexdigest()
        return self.digest

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256()}

    def compare(self, recorded: dict[str, Any]) -> str:
        """SAME: the recorded input is this one, unchanged (or a copy: the same content); CHANGED: this
        path, other content; OTHER: another input's result."""
        if (recorded.get("path"), recorded.get("size"), recorded.get("mtime_ns")) == (self.path, self.size,
                                                                                      self.mtime_ns):
            return SAME
        if recorded.get("size") == self.size and recorded.get("sha256") == self.sha256():
            return SAME
        return CHANGED if recorded.get("path") == self.path else OTHER


class InputFiles:
    """Where the inputs are, every way a target could reach one: the name as found, the resolved file,
    and the file itself (a hard link)."""

    def __init__(self, jobs: list[Job]):
        self.names, self.files = set(), set()
        for job in jobs:
            self.names.update({_resolved_name(job.source), os.path.realpath(job.source)})
            try:
                status = os.stat(job.source)
                self.files.add((status.st_dev, status.st_ino))
            except OSError:
                pass

    def hit_by(self, target: Path) -> bool:
        """Whether writing ``target`` (a rename onto its name) would replace an input."""
        if _resolved_name(target) in self.names or os.path.realpath(target) in self.names:
            return True
        try:
            status = os.stat(target)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) in self.files


def _resolved_name(path: Path) -> str:
    """``path`` with its folder resolved (links included) but not its last component: the directory
    entry a rename onto ``path`` replaces."""
    return os.path.join(os.path.realpath(path.parent), path.name)


@dataclass
class Task:
    job: Job
    targets: dict[str, Path]  # kind (cutout, mask, edge) -> result file
    kinds: tuple[str, ...] = ()  # the results to make with the model
    mask_from_cutout: bool = False  # the missing mask is the finished cutout's alpha
    redone: str | None = None  # why results already there are replaced (REDO_REASONS), None if none are
    source: Source | None = None  # the input, as classify found it

    @property
    def done(self) -> bool:
        return not self.kinds and not self.mask_from_cutout


def plan_tasks(inputs: Inputs, output: Path, kinds: list[str]) -> list[Task]:
    """Result paths per job; a job whose results would overwrite an input (found through links too) or
    another job's results is a failure (named in ``inputs.failures``)."""
    input_files = InputFiles(inputs.jobs)
    owner: dict[str, Job] = {}
    tasks = []
    for job in inputs.jobs:
        targets = {kind: output / job.name.parent / f"{job.name.name}{SUFFIXES[kind]}.png" for kind in kinds}
        clash = next((target for target in targets.values() if input_files.hit_by(target)), None)
        if clash is not None:
            inputs.failures.append(f"{job.source}: its result {clash} would overwrite an input; "
                                   "choose another --output")
            continue
        real = [_resolved_name(target) for target in targets.values()]
        twin = next((owner[r] for r in real if r in owner), None)
        if twin is not None:
            inputs.failures.append(f"{job.source}: its result name is taken by {twin.source}; "
                                   "run it with another --output")
            continue
        owner.update({r: job for r in real})
        tasks.append(Task(job, targets))
    return tasks


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the results depend on besides their input (each kind records its part: ``settings_for``)."""
    # The keys are the results' stored format (older results compare equal): not renamed with the options.
    return {"model": args.model, "base": args.base, "resolution": args.processing_res, "seed": args.seed,
            "tta": args.tta, "ensemble": args.ensemble_size, "normalize": not args.no_normalize,
            "refine_edges": not args.no_refine_edges, "refine_foreground": not args.no_refine_foreground,
            "keep_input_alpha": args.keep_input_alpha}


# Settings a kind of result does not depend on: left out of it, so changing them does not redo it.
SETTINGS_NOT_USED = {"cutout": set(), "mask": {"refine_foreground", "keep_input_alpha"},
                     "edge": {"refine_edges", "refine_foreground", "keep_input_alpha"}}


def settings_for(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a result of ``kind`` records (a result made with others is redone)."""
    return {key: value for key, value in settings.items() if key not in SETTINGS_NOT_USED[kind]}


def classify(task: Task, overwrite: bool, settings: dict[str, Any]) -> None:
    """Decide what ``task`` needs from the results already there: nothing, the mask from the cutout's
    alpha, and/or a model run writing the results that are missing or out of date. A result is up to
    date (make's word) when it records this input (``Source.compare``) and these settings and reads
    back whole. Raises DiffDISError for a file in the way that DiffDIS did not write, or that is
    another input's result."""
    from .image_io import is_whole_png, result_info

    task.source = Source.of(task.job.source)
    existing = [kind for kind, target in task.targets.items() if os.path.lexists(target)]
    if overwrite:
        task.kinds = tuple(task.targets)
        task.redone = "by --overwrite" if existing else None
        return
    reasons: dict[str, str] = {}  # kind -> why it is redone
    for kind in existing:
        target = task.targets[kind]
        info = result_info(target) if _not_a_file(target) is None else None  # never opens a FIFO
        if info is None or info.get("kind") != kind:
            raise DiffDISError(f"{target} exists and is not a DiffDIS {kind}; use --overwrite to replace it, "
                               "or another --output")
        recorded = info.get("input")
        match = task.source.compare(recorded) if isinstance(recorded, dict) else None
        if match == OTHER:
            raise DiffDISError(f"{target} is the result of another input, {recorded.get('path')}; "
                               "give another --output (or --overwrite to replace it)")
        if match is None:
            reasons[kind] = "made by an older version"  # one that did not record its input
        elif match == CHANGED:
            reasons[kind] = "input changed"
        elif info.get("settings") != settings_for(kind, settings):
            reasons[kind] = "other settings"
        elif not is_whole_png(target):
            reasons[kind] = "result incomplete"
        elif kind == "cutout" and info.get("alpha") == ALPHA_IS_MASK:
            # The same numbers as the cutout's alpha, at no cost (a new run may differ in the last bit).
            task.mask_from_cutout = True
    needed = [kind for kind in task.targets if kind not in existing or kind in reasons]
    task.mask_from_cutout = task.mask_from_cutout and "mask" in needed
    task.kinds = tuple(kind for kind in needed if not (kind == "mask" and task.mask_from_cutout))
    task.redone = next((reason for reason in REDO_REASONS if reason in reasons.values()), None)


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
        reason = "out of memory (a smaller --processing-res or --max-megapixels helps)"
    else:
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0] if text else 'no details'}"
    prefix = f"{source}: "
    return f"failed {source}: {reason[len(prefix):] if reason.startswith(prefix) else reason}"


class Worker:
    """Runs one task: loads the image, runs the pipeline, writes the results it lacks."""

    def __init__(self, pipe: Any, args: argparse.Namespace, settings: dict[str, Any], inputs: InputFiles):
        self.pipe, self.args, self.settings, self.inputs = pipe, args, settings, inputs
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
        # Fingerprinted before it is read: an input changed meanwhile is redone by the next run.
        task.source = Source.of(task.job.source, known=task.source)
        task.source.sha256()
        if task.mask_from_cutout:
            self._derive_mask(task)
        if task.kinds:
            self._run(task)

    def _save(self, image: Any, task: Task, kind: str, **info: Any) -> None:
        from .image_io import save_image

        target = task.targets[kind]
        if self.inputs.hit_by(target):  # checked again as it is written: folders may have changed since
            raise DiffDISError(f"its result {target} would overwrite an input; choose another --output")
        try:
            save_image(image, target, {"kind": kind, "settings": settings_for(kind, self.settings),
                                       "input": task.source.record(),
                                       **info})
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
        from .devices import reuse_freed_memory
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
        # The subject's own colours where the mask is soft (no fringe of the old background): an 8-bit image's
        # are written over its decoded pixels (this run's own copy; the input file is never touched).
        rgb = image.rgb()[None]
        with reuse_freed_memory():  # the refinements' band buffers: reused, not left as heap fragments
            colours, alpha = cutout_rgba(rgb, result.mask.float().cpu(), refine_edges=not args.no_refine_edges,
                                         refine_foreground=refine_foreground, as_uint8=True, in_place=True)
        if refine_foreground and colours.data_ptr() != rgb.data_ptr():  # 16-bit and float images
            image.rgba[..., :3] = colours[0].permute(1, 2, 0).numpy()
        mask = alpha[0, 0].numpy()
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

    with option_names(model="--model ", base="--base "):
        return DiffDISPipeline.from_pretrained(args.model, base=args.base, torch_dtype=pick_dtype(args.dtype, device),
                                               device=device, compile=args.compile)


def run(args: argparse.Namespace) -> int:
    from .spec import check_processing_res

    # Before any model loads, under the option's name (the pipeline's check_inputs checks them again).
    check_processing_res(args.processing_res, tta=args.tta, name="--processing-res")
    output = Path(os.path.expanduser(args.output))
    prepare_output(output)

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the pixel budget is --max-megapixels, checked from each header

    from .distributed import process_device

    state, device = process_device(args.device)  # the command lines' one device choice
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
    counts = Counter(written=0, done=0, failed=len(inputs.failures) if is_main else 0)
    todo = []
    for task in mine:
        try:
            classify(task, args.overwrite, settings)
        except DiffDISError as error:
            say(describe_failure(error, task.job.source), always=True)
            counts["failed"] += 1
            continue
        if task.done:
            counts["done"] += 1
        else:
            todo.append(task)

    started = None
    if any(_gather(state, [bool(todo)])):
        pipe = _load_on_each(state, device, args, any(task.kinds for task in todo))
        worker = Worker(pipe, args, settings, InputFiles(inputs.jobs))
        started = time.perf_counter()
        for task in _progress(todo, is_main, world):
            try:
                worker(task)
                counts["written"] += 1
                if task.redone:
                    counts[f"redone: {task.redone}"] += 1
            except Exception as error:  # any per-image failure: one line, the batch goes on
                say(describe_failure(error, task.job.source), always=True)
                counts["failed"] += 1

    total = sum(_gather(state, [counts]), Counter())
    if state is not None:
        state.destroy_process_group()  # together, so no process exits while another still talks to it
    elapsed = time.perf_counter() - started if started is not None else 0.0  # after the model loaded
    if is_main:
        rate = f", {total['written'] / elapsed:.2f} images/s" if total["written"] and elapsed > 0 else ""
        redone = {key.split(": ", 1)[1]: total[key] for key in sorted(total) if key.startswith("redone: ")}
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(
            redone.items(), key=lambda item: REDO_REASONS.index(item[0])))
        written = f"{total['written']} written" + (f" ({sum(redone.values())} redone: {why})" if redone else "")
        summary = f"{written}, {total['done']} already done, {total['failed']} failed"
        if not total["written"] and not total["failed"] and total["done"]:
            summary += ": all inputs were already done"
        elif not (total["written"] or total["failed"] or total["done"]):
            summary += ": no inputs"
        say(f"{summary} ({output}; {elapsed:.1f} s{rate})")
    return EXIT_SOME_FAILED if total["failed"] or not (total["written"] or total["done"]) else EXIT_OK


# ---------------------------------------------------------------------------------------------- processes
def _gather(state: Any, items: list) -> list:
    if state is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _load_on_each(state: Any, device: Any, args: argparse.Namespace, needed: bool) -> Any:
    """The pipeline on this process's device; under a launch the main process loads (downloads) first."""
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
    """The exit code of ``diffdis argv``: --help and usage errors (one line, printed) included."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else EXIT_OK
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
