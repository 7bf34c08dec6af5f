"""Fine-tune DiffDIS from SD-Turbo on DIS5K (or any dataset in its layout) with the paper's recipe.

    python training/train.py --dataset /data/DIS5K --output runs/dis                    # one GPU (or CPU)
    accelerate launch --multi_gpu --num_processes 2 training/train.py --batch-size 2 --dataset ... --output ...
    python training/train.py --dataset /data/DIS5K --output runs/dis --resume          # continue a killed run

(``diffdis-train`` once the package is installed.) Under ``accelerate launch`` every process is one rank;
on a machine without GPUs the processes train together on the CPU (gloo).

Recipe (defaults; every part has a flag for ablations): the DiffDIS UNet initialised from SD-Turbo (conv_in
widened, DBIA copied from self-attention, SWCI outputs at zero), VAE and text encoder frozen; flip, centred
crop, rotation, colour jitter, CutMix within pairs; pyramid noise at t = 999; one-step x̂0; MSE on mask and
edge latents; Adam 3e-5 (BDE projection 10×) with the authors' decay (×0.95^(e // 30) after each epoch e);
batch 4 at 1024²; TF32 on CUDA.

Output folder: train_log.jsonl (one line per logged step), val_log.jsonl (with --validate-every),
checkpoint-<step>/ (UNet in the released layout + accelerate's optimizer, scheduler and RNG state; written
to a temporary folder and renamed, the last --keep-checkpoints kept), edge_cache/, and final/: a complete
model folder for ``DiffDISPipeline.from_pretrained(final, base=None)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python training/train.py`: run as its package's module
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout, in place of this folder
    runpy.run_module(f"{Path(__file__).resolve().parent.name}.train", run_name="__main__", alter_sys=True)

from diffdis_core.commandline import OneLineErrorParser, base_option, number, run_main
from diffdis_core.errors import DiffDISError
from diffdis_core.files import apply_umask, make_temporary_folder, read_json, safetensors_shapes, write_bytes_atomic
from diffdis_core.spec import DEFAULT_BASE, DEFAULT_PROCESSING_RES, UNET_WEIGHTS_NAMES, check_processing_res

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_NAME = re.compile(r"^checkpoint-\d+\.damaged\d*$")
# What a killed run leaves: checkpoint and final/ folders being written (files.make_temporary_folder's
# names; .partial from earlier versions) and the final/ being replaced.
UNFINISHED_NAME = re.compile(r"^\.(checkpoint-\d+|final)\.(.+\.tmp|partial|old)$")
STATE_FILE = "training_state.json"
LOG_FILE = "train_log.jsonl"
VAL_LOG_FILE = "val_log.jsonl"
FINAL_DIR = "final"
# What defines "step N" and the data order: a resumed run must keep these.
RUN_IDENTITY = ("batch_size", "gradient_accumulation_steps", "seed", "num_processes", "train_samples")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description="Train DiffDIS (one-step dichotomous image segmentation) from SD-Turbo.")
    # Refused as they are parsed: a non-finite, negative or (where it means nothing) zero value.
    at_least_0, at_least_1 = number(int, 0), number(int, 1)
    positive, non_negative, probability = number(float, 0, low_open=True), number(float, 0), number(float, 0, 1)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained", default=DEFAULT_BASE,
                   help=f"SD-Turbo folder (diffusers layout) or Hugging Face repo to start from "
                        f"(default {DEFAULT_BASE}); a DiffDIS model folder fine-tunes that model instead")
    g.add_argument("--base", default=DEFAULT_BASE,
                   help="SD-Turbo folder or repo for parts --pretrained lacks (VAE, text encoder); 'none' for none")
    g.add_argument("--random-init", action="store_true", help="ablation: random UNet weights instead of SD-Turbo's")
    g.add_argument("--dataset", required=True,
                   help="DIS5K root (DIS-TR/im, DIS-TR/gt, ...) or a folder with im/ and gt/")
    g.add_argument("--train-split", default="DIS-TR", help="training split under --dataset (default DIS-TR)")
    g.add_argument("--output", required=True, help="run folder: logs, checkpoints, final model")
    g.add_argument("--edge-cache", help="where edge maps are cached (default OUTPUT/edge_cache); never the dataset "
                                        "unless you point this there")
    g = p.add_argument_group("recipe")
    g.add_argument("--resolution", type=number(int), default=DEFAULT_PROCESSING_RES,
                   help=f"training crop size, a multiple of 64 (the SWCI scales must line up; default "
                        f"{DEFAULT_PROCESSING_RES}, the processing size the model then runs at)")
    g.add_argument("--batch-size", type=at_least_1, default=4,
                   help="images per process and step (default 4; even for CutMix)")
    g.add_argument("--gradient-accumulation-steps", type=at_least_1, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=at_least_1, default=100, help="epochs (default 100)")
    g.add_argument("--max-steps", type=at_least_1, default=None,
                   help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=positive, default=3e-5, help="Adam learning rate (default 3e-5)")
    g.add_argument("--bde-lr-scale", type=positive, default=10.0, help="lr factor of the BDE projection (default 10)")
    g.add_argument("--lr-decay", type=positive, default=0.95, help="lr factor every --lr-decay-epochs (default 0.95)")
    g.add_argument("--lr-decay-epochs", type=at_least_1, default=30, help="epochs between lr decays (default 30)")
    g.add_argument("--lr-schedule", choices=["authors", "step"], default="authors",
                   help="authors (default): their code's decay, after epoch e the lr is multiplied by "
                        "decay^(e // 30), which compounds from epoch 30 on; step: lr × decay^(epoch // 30), "
                        "as the paper words it")
    g.add_argument("--max-grad-norm", type=non_negative, default=0.0,
                   help="clip gradients to this norm (default 0: off, as the paper)")
    g.add_argument("--edge-weight", type=non_negative, default=1.0, help="weight of the edge loss (default 1)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--no-crop", action="store_true", help="no random centred crop")
    g.add_argument("--no-rotation", action="store_true", help="no random rotation")
    g.add_argument("--rotation-prob", type=probability, default=0.2, help="probability of a rotation (default 0.2)")
    g.add_argument("--no-color-jitter", action="store_true", help="no brightness/contrast/colour/sharpness changes")
    g.add_argument("--no-cutmix", action="store_true", help="no CutMix within pairs")
    g.add_argument("--cutmix-prob", type=probability, default=0.5,
                   help="probability of a CutMix box per image (default 0.5)")
    g.add_argument("--no-pyramid-noise", action="store_true", help="plain Gaussian noise instead of pyramid noise")
    g.add_argument("--pyramid-discount", type=non_negative, default=0.8, help="pyramid-noise discount (default 0.8)")
    g.add_argument("--seed", type=at_least_0, default=0,
                   help="seed of the data order, augmentation, noise and new layers")
    g = p.add_argument_group("hardware")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: accelerate's config, else no = fp32 as the paper)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on CUDA (default on: faster on Ampere and newer, about "
                        "10 bits of mantissa in those products; --no-tf32 for full fp32 as the paper's setting)")
    g.add_argument("--num-workers", type=at_least_0, default=min(8, os.cpu_count() or 1), help="data-loading workers")
    g = p.add_argument_group("logging, checkpoints, validation")
    g.add_argument("--log-every", type=at_least_1, default=10, help="steps between train_log.jsonl lines (default 10)")
    g.add_argument("--checkpoint-every", type=at_least_1, default=1000, help="steps between checkpoints (default 1000)")
    g.add_argument("--keep-checkpoints", type=at_least_0, default=2,
                   help="checkpoints kept, newest first (0: all; default 2)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output that has a run (deletes its checkpoints, logs and final/)")
    g.add_argument("--validate-every", type=at_least_0, default=0, help="steps between validations (default 0: none)")
    g.add_argument("--val-dataset", help="dataset for validation (default --dataset)")
    g.add_argument("--val-split", default="DIS-VD", help="validation split (default DIS-VD)")
    g.add_argument("--val-resolution", type=number(int), default=None,
                   help="validation processing size, a multiple of 64, of 256 with --val-tta (default --resolution)")
    g.add_argument("--val-max-images", type=at_least_1, default=None, help="validate on the first N images only")
    g.add_argument("--val-tta", action="store_true", help="validate with the authors' test-time augmentation")
    g.add_argument("--val-hce", action="store_true", help="also compute HCE in validation (slow)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """What the option types cannot check alone (the numbers' ranges are checked as they are parsed)."""
    check_processing_res(args.resolution, name="--resolution")
    if args.validate_every:
        name = "--val-resolution" if args.val_resolution is not None else "--resolution (the validation size)"
        check_processing_res(args.val_resolution or args.resolution, tta=args.val_tta, name=name)
    if not args.no_cutmix and args.batch_size % 2:
        raise DiffDISError(f"CutMix mixes the images of each pair in a batch: --batch-size must be even "
                           f"(got {args.batch_size}), or pass --no-cutmix")
    if args.resume and args.overwrite:
        raise DiffDISError("--resume continues the run in --output, --overwrite deletes it: pass only one")


# ---------------------------------------------------------------------------------------------- output folder
def checkpoints_in(output: Path) -> list[tuple[int, Path]]:
    """The checkpoint-<step> folders, oldest first. A checkpoint only gets that name once complete (it is
    written as .checkpoint-<step>.partial and renamed); ``check_checkpoint`` tells whether it was damaged since."""
    found = []
    if output.is_dir():
        for path in output.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def read_training_state(folder: Path) -> dict:
    """A checkpoint's training_state.json, checked (DiffDISError naming the file otherwise)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise DiffDISError(f"{path} is missing")
    state = read_json(path)
    step = state.get("step")
    if not isinstance(step, int) or step < 0 or not isinstance(state.get("identity"), dict):
        raise DiffDISError(f"{path} does not hold a training state (a step and the run's settings)")
    return state


def check_checkpoint(folder: Path) -> dict:
    """The checkpoint's training state if all its files are there and whole; otherwise DiffDISError naming
    the first damaged file. Cheap: file headers only (a truncated zip or safetensors file fails here)."""
    state = read_training_state(folder)
    if state["step"] != int(CHECKPOINT_NAME.match(folder.name).group(1)):
        raise DiffDISError(f"{folder / STATE_FILE} is for step {state['step']}, not the folder's step")
    for path in (folder / "unet" / "config.json", folder / "unet" / UNET_WEIGHTS_NAMES[0]):
        if not path.is_file():
            raise DiffDISError(f"{path} is missing")
    read_json(folder / "unet" / "config.json")
    safetensors_shapes(folder / "unet" / UNET_WEIGHTS_NAMES[0])  # whole, to its last byte
    processes = state["identity"].get("num_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise DiffDISError(f"{folder / STATE_FILE} does not hold a training state (num_processes {processes!r})")
    for name in ("optimizer.bin", "scheduler.bin", *(f"random_states_{rank}.pkl" for rank in range(processes))):
        path = folder / name
        if not path.is_file():
            raise DiffDISError(f"{path} is missing")
        try:  # torch.save writes a zip archive; its index is at the end, so a truncated file has none
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile) as error:
            raise DiffDISError(f"{path} is truncated or damaged ({error})") from None
    return state


def choose_checkpoint(output: Path) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest undamaged checkpoint and its state, and (folder, what is wrong) for each newer damaged one.

    Raises DiffDISError when there are checkpoints but none is whole."""
    damaged: list[tuple[Path, str]] = []
    for _, folder in reversed(checkpoints_in(output)):
        try:
            return folder, check_checkpoint(folder), damaged
        except DiffDISError as problem:
            damaged.append((folder, str(problem)))
    if damaged:
        more = f" (and {len(damaged) - 1} older checkpoint(s) are damaged too)" if len(damaged) > 1 else ""
        raise DiffDISError(f"cannot resume: {damaged[0][1]}{more}; start over with --overwrite")
    return None, None, []


def set_aside(folder: Path, suffix: str = ".damaged") -> Path:
    """Rename a checkpoint out of the names that are resumed from and rotated (``.damaged``: kept for
    inspection; ``.start``: the model a --overwrite run starts from)."""
    target = folder.with_name(folder.name + suffix)
    index = 1
    while target.exists():
        index += 1
        target = folder.with_name(f"{folder.name}{suffix}{index}")
    os.replace(folder, target)
    return target


def previous_run_files(output: Path) -> list[Path]:
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir()
                  if CHECKPOINT_NAME.match(p.name) or DAMAGED_NAME.match(p.name) or UNFINISHED_NAME.match(p.name)
                  or p.name in (FINAL_DIR, LOG_FILE, VAL_LOG_FILE))


def remove_unfinished(output: Path) -> None:
    """What a killed run was writing (the checkpoint and final/ before it are intact)."""
    for path in output.iterdir():
        if UNFINISHED_NAME.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def remove_previous_run(output: Path, keep: list[Path], say: Callable[[str], None]) -> None:
    """--overwrite: delete only what a training run writes (never the edge cache or other files), and not
    the model this run starts from (``keep``: its folders or files): final/ stays until this run's own
    replaces it, a checkpoint is renamed .start (so it is neither resumed from nor rotated away)."""
    keep = [path.resolve() for path in keep]
    for path in previous_run_files(output):
        if any(kept == path.resolve() or path.resolve() in kept.parents for kept in keep):
            if path.name != FINAL_DIR:
                say(f"kept the starting model {path} as {set_aside(path, '.start').name}")
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (work lost with the run that was killed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def append_json_line(path: Path, record: dict) -> None:
    # Appended, not rewritten per line (a torn last line is dropped by truncate_log on resume).
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path: Path, record: dict) -> None:
    write_bytes_atomic(path, json.dumps(record, indent=2).encode())


# ---------------------------------------------------------------------------------------------- model
def load_training_start(pretrained: str, base: str | None, random_init: bool):
    """(DiffDIS UNet to train, VAE, scheduler, empty-prompt embedding, what was done)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffdis_core import DiffDISUNet
    from diffdis_core.loading import ModelSources, load_scheduler, load_vae
    from diffdis_core.unet import read_unet_state_dict

    sources = ModelSources.resolve(pretrained, base)
    state, _ = read_unet_state_dict(sources.unet_weights)
    config = {k: v for k, v in sources.unet_config().items() if not k.startswith("_")}
    if "rgb_conv.0.0.weight" in state:  # already a DiffDIS UNet: fine-tune it
        unet = DiffDISUNet.from_state_dict(state, config, torch.float32, source=str(sources.unet_weights))
        how = f"fine-tuning the DiffDIS UNet {sources.unet_weights}"
    else:
        with torch.device("meta"):
            sd_unet = UNet2DConditionModel.from_config(config)
        try:
            sd_unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        except RuntimeError as error:
            detail = str(error).splitlines()
            detail = detail[1].strip() if len(detail) > 1 else detail[0]
            raise DiffDISError(f"{sources.unet_weights} does not match its config.json ({detail}); "
                               "give an SD-Turbo (SD 2.x) folder in diffusers layout") from None
        if random_init:
            unet = DiffDISUNet.from_config(config)
            how = "random initialisation (ablation), SD-Turbo architecture"
        else:
            unet = DiffDISUNet.from_sd_turbo(sd_unet)
            how = f"DiffDIS UNet initialised from {sources.unet_weights} (SD-Turbo recipe)"
        del sd_unet
    del state
    # The pipeline's own loaders: bounded configs, the one VAE upcast rule, the epsilon parameterisation.
    vae = load_vae(sources.component("vae"), torch.float32)
    scheduler = load_scheduler(sources.component("scheduler", required=False))
    embed = sources.empty_embedding(cache=False)  # never writes into the user's model folder
    return unet, vae, scheduler, embed, how


# ---------------------------------------------------------------------------------------------- phases
# train() runs them in this order. Everything that can be checked (options, output folder, data, resume
# point, starting model) is checked before anything in the output folder is removed or written.
@dataclass
class Run:
    """The run folder and this process's place in the launch."""

    args: argparse.Namespace
    output: Path
    accelerator: Any
    say: Callable[..., None]  # prints on the main process only
    identity: dict = field(default_factory=dict)  # RUN_IDENTITY's values
    resume_from: Path | None = None
    resume_state: dict | None = None
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that are not whole

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process


def open_run(args: argparse.Namespace) -> Run:
    """Phase 1: check the options and the output folder, start accelerate. Writes nothing."""
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from diffdis_core.distributed import make_accelerator

    check_args(args)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise DiffDISError(f"--output {output} is a file; give a folder")
    existing = previous_run_files(output)
    if existing and not (args.resume or args.overwrite):
        names = ", ".join(p.name for p in existing[:3])
        raise DiffDISError(f"{output} already has a training run ({names}); pass --resume to continue it, "
                           "--overwrite to delete it and start over, or choose another --output")
    try:
        # Every launched process is one rank: GPUs, or CPU processes with gloo where there is no GPU.
        accelerator = make_accelerator(mixed_precision=args.mixed_precision,
                                       gradient_accumulation_steps=args.gradient_accumulation_steps,
                                       step_scheduler_with_optimizer=False,  # stepped once per optimizer update
                                       project_config=ProjectConfiguration(project_dir=str(output)))
    except (ValueError, RuntimeError) as error:
        raise DiffDISError(f"accelerate could not set up this run: {str(error).splitlines()[0]}") from None
    return Run(args, output, accelerator, tqdm.write if accelerator.is_main_process else (lambda *a, **k: None))


@dataclass
class TrainingData:
    folder: Path  # the training split's folder
    train: list  # Samples
    validation: list


def find_data(run: Run) -> TrainingData:
    """Phase 2: the training (and validation) pairs, every image and mask decoded once, so that a damaged
    file stops the run now, naming it, not when it is first sampled."""
    from .data import find_pairs, split_folder

    args, accelerator = run.args, run.accelerator
    train_folder = split_folder(args.dataset, args.train_split)
    train_samples = find_pairs(train_folder, check_sizes=True)
    per_step = args.batch_size * accelerator.num_processes
    if len(train_samples) < per_step:
        raise DiffDISError(f"{train_folder} has {len(train_samples)} image(s), fewer than one step needs "
                           f"({args.batch_size} per process × {accelerator.num_processes}); lower --batch-size")
    val_samples = []
    if args.validate_every:
        val_folder = split_folder(args.val_dataset or args.dataset, args.val_split)
        if val_folder.resolve() == train_folder.resolve():
            raise DiffDISError(f"validation would use the training images ({val_folder}); give --val-dataset")
        val_samples = find_pairs(val_folder)[: args.val_max_images]
    check_images(run, train_samples + val_samples)
    return TrainingData(train_folder, train_samples, val_samples)


def check_images(run: Run, samples: list) -> None:
    """Every pair decodes, or DiffDISError naming the first that does not (each process checks its share)."""
    from accelerate.utils import gather_object

    from .data import damaged_samples

    accelerator = run.accelerator
    with accelerator.split_between_processes(samples) as share:
        problems = damaged_samples(list(share), num_workers=run.args.num_workers, progress=run.main_process)
    if accelerator.num_processes > 1:
        problems = gather_object(problems)  # in rank order: the shares are consecutive
    if problems:
        more = f" ({len(problems) - 1} more pair(s) are damaged too)" if len(problems) > 1 else ""
        raise DiffDISError(problems[0] + more)


def find_resume_point(run: Run, data: TrainingData) -> None:
    """Phase 2b: with --resume, the newest whole checkpoint, which must be from a run with the same data order."""
    args = run.args
    run.identity = {"batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "seed": args.seed, "num_processes": run.accelerator.num_processes,
                    "train_samples": len(data.train)}
    if not args.resume:
        return
    run.resume_from, run.resume_state, run.damaged = choose_checkpoint(run.output)
    if run.resume_state is not None:
        changed = [f"{k} {run.resume_state['identity'][k]} -> {run.identity[k]}" for k in RUN_IDENTITY
                   if run.resume_state["identity"].get(k) != run.identity[k]]
        if changed:
            raise DiffDISError(f"cannot resume {run.resume_from}: {', '.join(changed)} would change the data "
                               "order; resume with the same settings or start a new --output")


@dataclass
class StartingModel:
    unet: Any  # the DiffDISUNet to train
    vae: Any
    scheduler: Any
    embed: Any  # the empty-prompt embedding


def load_model(run: Run) -> StartingModel:
    """Phase 3: the starting model, loaded whole (a typo or a damaged file stops here, before any deletion)."""
    from accelerate.utils import set_seed

    from diffdis_core.hub import option_names

    args = run.args
    # Seeded right before the new layers' initialisation (BDE projection, SWCI input convs); what runs
    # between here and the loop (edge maps, only on a fresh cache) draws from its own generators.
    set_seed(args.seed)
    with option_names(model="--pretrained ", base="--base "):  # error messages name this script's options
        unet, vae, scheduler, embed, how = load_training_start(args.pretrained, base_option(args.base),
                                                               args.random_init)
    run.say(how)
    return StartingModel(unet, vae, scheduler, embed)


def starting_model_paths(args: argparse.Namespace) -> list[Path]:
    """The local folders or files the starting model was read from (--pretrained, --base)."""
    return [Path(name) for name in (args.pretrained, base_option(args.base)) if name and Path(name).exists()]


def prepare_output(run: Run, data: TrainingData) -> Path:
    """Phase 4: only now is the output folder changed (--overwrite's deletion, leftovers of a killed run,
    damaged checkpoints set aside); the edge maps are written. Returns the edge-map folder."""
    import torch

    from .data import edge_cache_folder, prepare_edge_maps

    args, output, say = run.args, run.output, run.say
    if run.main_process:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DiffDISError(f"cannot create --output {output} ({error.strerror})") from None
        if args.overwrite:
            remove_previous_run(output, starting_model_paths(args), say)
        remove_unfinished(output)
        for folder, problem in run.damaged:
            aside = set_aside(folder)
            say(f"{problem}: resuming from {run.resume_from.name} instead (the damaged one is now {aside.name})")
        if args.resume and run.resume_from is None:
            say(f"no checkpoint in {output}: starting from step 0")
            for log in (LOG_FILE, VAL_LOG_FILE):
                (output / log).unlink(missing_ok=True)
    run.accelerator.wait_for_everyone()
    if torch.cuda.is_available():  # TF32 on by default (--no-tf32: full fp32 products, as the paper)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    edge_folder = edge_cache_folder(args.edge_cache or output / "edge_cache", data.folder)
    if run.main_process:
        made = prepare_edge_maps(data.train, edge_folder, num_workers=args.num_workers)
        if made:
            say(f"wrote {made} edge map(s) to {edge_folder}")
    run.accelerator.wait_for_everyone()
    return edge_folder


@dataclass
class TrainResult:
    final: Path  # the model folder written by the main process
    steps: int
    unet: Any  # this process's trained DiffDISUNet (every rank holds the same weights)


class Training:
    """Phases 5 and 6: the optimisation loop with its logs, checkpoints and validations, then final/."""

    def __init__(self, run: Run, data: TrainingData, model: StartingModel, edge_folder: Path):
        import torch

        from diffdis_core import DiffDISPipeline
        from diffdis_core.devices import vae_under_autocast

        from .data import Augmentation, CutMixCollate, DISTrainDataset, EpochShuffleSampler
        from .recipe import lr_multiplier, optimizer_param_groups

        args, accelerator = run.args, run.accelerator
        self.run, self.args, self.accelerator, self.data = run, args, accelerator, data
        model.vae.requires_grad_(False)
        model.vae.to(accelerator.device)
        self.vae, self.scheduler = model.vae, model.scheduler
        self.pipe = DiffDISPipeline(model.unet, model.vae, model.scheduler, model.embed)  # its VAE encoding
        model.unet.train()  # (the pipeline set eval mode)
        if args.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        self.embed = model.embed.to(accelerator.device)
        self.vae_autocast = vae_under_autocast(accelerator.mixed_precision, model.vae.config)  # the upcast rule

        augmentation = Augmentation(flip=not args.no_flip, crop=not args.no_crop, rotation=not args.no_rotation,
                                    rotation_prob=args.rotation_prob, color=not args.no_color_jitter,
                                    cutmix=not args.no_cutmix, cutmix_prob=args.cutmix_prob)
        dataset = DISTrainDataset(data.train, edge_folder, args.resolution, augmentation, args.seed)
        self.sampler = EpochShuffleSampler(len(dataset), args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, sampler=self.sampler, drop_last=True, num_workers=args.num_workers,
            collate_fn=CutMixCollate(augmentation.cutmix), pin_memory=torch.cuda.is_available(),
            persistent_workers=args.num_workers > 0)
        optimizer = torch.optim.Adam(optimizer_param_groups(model.unet, args.lr, args.bde_lr_scale))
        self.unet, self.optimizer, self.loader = accelerator.prepare(model.unet, optimizer, loader)

        self.updates_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        self.total_steps = args.max_steps or args.epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.updates_per_epoch)
        compound = args.lr_schedule == "authors"
        self.lr_scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda step: lr_multiplier(
                step // self.updates_per_epoch, args.lr_decay, args.lr_decay_epochs, compound)))
        accelerator.register_save_state_pre_hook(self._save_unet)
        accelerator.register_load_state_pre_hook(self._load_unet)
        self.images_per_step = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        self.last_names: list[str] = []  # the last micro-batch's images (logged)
        self.global_step = 0
        self.last_saved: int | None = None
        self.rotation_due = False  # a checkpoint was written: older ones go once a step from it is finite

    # ------------------------------------------------------------------ checkpoints
    def _save_unet(self, models, weights, folder):
        # The UNet goes into unet/ in the released layout instead of accelerate's model.safetensors.
        if self.run.main_process:
            for model in models:
                self.accelerator.unwrap_model(model).save_pretrained(Path(folder) / "unet")
        weights.clear()

    def _load_unet(self, models, folder):
        import torch

        from diffdis_core import DiffDISUNet

        while models:
            model = models.pop()
            loaded = DiffDISUNet.from_pretrained(Path(folder) / "unet", torch_dtype=torch.float32)
            self.accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())

    def resume(self) -> None:
        run = self.run
        if run.resume_from is None:
            return
        # accelerate's own state files (optimizer, scheduler, RNG), written by this script; loaded with
        # weights_only unpickling. The UNet is read from unet/ (safetensors) by _load_unet.
        try:
            self.accelerator.load_state(str(run.resume_from))
        except Exception as error:  # files that looked whole but do not load (damaged inside)
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DiffDISError(f"could not load {run.resume_from} ({detail}); move it out of {run.output} to resume "
                               "from an earlier checkpoint, or start over with --overwrite") from None
        self.global_step = self.last_saved = int(run.resume_state["step"])
        if run.main_process:
            for log in (LOG_FILE, VAL_LOG_FILE):
                truncate_log(run.output / log, self.global_step)
        run.say(f"resumed from {run.resume_from} at step {self.global_step}")

    def check_weights(self, step: int) -> None:
        """Finite weights, or DiffDISError: never saved as a checkpoint or final/."""
        import torch

        parameters = list(self.accelerator.unwrap_model(self.unet).parameters())
        if not bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()):
            raise self.diverged(step, "the weights are not finite")

    def save_checkpoint(self, step: int) -> None:
        """checkpoint-<step>, written in a new temporary folder and renamed when complete: the previous
        checkpoint stays valid until then."""
        from accelerate.utils import broadcast_object_list

        run, accelerator = self.run, self.accelerator
        self.check_weights(step)
        target = run.output / f"checkpoint-{step}"
        folder = [make_temporary_folder(target) if run.main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(folder)  # every rank adds its RNG state to the same folder
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder[0]))
        accelerator.wait_for_everyone()
        if run.main_process:
            write_json(folder[0] / STATE_FILE, {"step": step, "epoch": step / self.updates_per_epoch,
                                                "identity": run.identity, "args": vars(self.args)})
            apply_umask(folder[0])
            if target.exists():  # only when a finished run re-saves its last step
                shutil.rmtree(target)
            os.replace(folder[0], target)
        accelerator.wait_for_everyone()
        self.last_saved, self.rotation_due = step, True

    def remove_old_checkpoints(self) -> None:
        """All but the newest --keep-checkpoints, once the newest has given a finite loss (a run that
        diverges keeps every checkpoint from before)."""
        if self.run.main_process and self.args.keep_checkpoints:
            for _, old in checkpoints_in(self.run.output)[: -self.args.keep_checkpoints]:
                shutil.rmtree(old)
        self.rotation_due = False

    def diverged(self, step: int, what: str) -> DiffDISError:
        kept = ", ".join(path.name for _, path in checkpoints_in(self.run.output)) or "none yet"
        return DiffDISError(f"{what} at step {step}: training stopped, no {FINAL_DIR}/ written, every checkpoint "
                            f"kept ({kept}); lower --lr (now {self.args.lr:g}) or set --max-grad-norm")

    def validate(self, step: int) -> None:
        import torch

        from diffdis_core import DiffDISPipeline

        from .evaluate import gather_partials, predict_and_score
        from .metrics import combine

        args, accelerator = self.args, self.accelerator
        model = accelerator.unwrap_model(self.unet)
        val_pipe = DiffDISPipeline(model, self.vae, self.scheduler, self.embed)
        with torch.inference_mode():
            partial = predict_and_score(
                val_pipe, self.data.validation, processing_res=args.val_resolution or args.resolution,
                tta=args.val_tta, seed=args.seed, hce=args.val_hce, num_workers=min(2, args.num_workers),
                progress=self.run.main_process, desc=f"validate {args.val_split}",
                autocast=accelerator.autocast if accelerator.mixed_precision != "no" else None)
        results = combine(gather_partials(partial))
        model.train()
        if self.run.main_process:
            record = {"step": step, "epoch": round(step / self.updates_per_epoch, 4), "split": args.val_split,
                      **results}
            append_json_line(self.run.output / VAL_LOG_FILE, record)
            self.run.say(f"step {step} {args.val_split}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in results.items() if k != "images"))

    # ------------------------------------------------------------------ the loop
    def noise_generator(self, step: int, micro: int):
        import numpy as np
        import torch

        # Noise depends only on (seed, step, micro-batch, process): a resumed run draws the same noise.
        entropy = np.random.SeedSequence([self.args.seed, step, micro, self.accelerator.process_index])
        state = entropy.generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def micro_step(self, batch: dict, micro: int):
        """One micro-batch: forward, backward and (at the end of an accumulation) the optimizer step."""
        import torch

        from .recipe import encode_batch, gaussian_noise_like, one_step_losses, pyramid_noise_like

        args, accelerator = self.args, self.accelerator
        with accelerator.accumulate(self.unet):
            with torch.no_grad(), (accelerator.autocast() if self.vae_autocast else torch.autocast(
                    accelerator.device.type, enabled=False)):
                rgb_latents, target = encode_batch(self.pipe, batch["image"], batch["mask"], batch["edge"])
            generator = self.noise_generator(self.global_step, micro)
            noise = (gaussian_noise_like(target, generator) if args.no_pyramid_noise
                     else pyramid_noise_like(target, args.pyramid_discount, generator))
            losses = one_step_losses(self.unet, self.scheduler, self.embed, rgb_latents, target, noise,
                                     args.edge_weight)
            accelerator.backward(losses.total)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(self.unet.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    def loop(self) -> None:
        import torch
        from tqdm.auto import tqdm

        args, accelerator, run = self.args, self.accelerator, self.run
        run.say(f"{len(self.data.train)} training images, {self.updates_per_epoch} steps per epoch, "
                f"{self.total_steps} steps ({self.num_epochs} epochs), {self.images_per_step} images per step "
                f"({args.batch_size} × {accelerator.num_processes} process(es) × {args.gradient_accumulation_steps}),"
                f" {args.resolution}², mixed precision {accelerator.mixed_precision}, device {accelerator.device}")
        self.progress = tqdm(total=self.total_steps, initial=self.global_step, desc="train", unit="step",
                             disable=not run.main_process, dynamic_ncols=True)
        self.sums = torch.zeros(5, device=accelerator.device)  # loss, mask, edge, micro-batches, non-finite losses
        self.since_log = (self.global_step, time.perf_counter())  # the step and time of the last log line
        micro = 0
        first_epoch, skip_batches = divmod(self.global_step, self.updates_per_epoch)
        skip_batches *= args.gradient_accumulation_steps
        try:
            for epoch in range(first_epoch, self.num_epochs):
                if self.global_step >= self.total_steps:
                    break
                self.sampler.set_epoch(epoch)
                epoch_loader = self.loader
                if skip_batches:
                    epoch_loader = accelerator.skip_first_batches(self.loader, skip_batches)
                    skip_batches = 0
                epoch_loader.set_epoch(epoch)  # keeps accelerate's own epoch counter in step with ours
                for batch in epoch_loader:
                    losses = self.micro_step(batch, micro)
                    total = losses.total.detach()
                    self.sums += torch.stack([total, losses.mask.detach(), losses.edge.detach(),
                                              torch.ones_like(total), (~torch.isfinite(total)).float()])
                    self.last_names = list(batch["name"])
                    micro += 1
                    if not accelerator.sync_gradients:
                        continue
                    micro = 0
                    self.end_step()
                    if self.global_step >= self.total_steps:
                        break
        except KeyboardInterrupt:
            self.progress.close()
            kept = checkpoints_in(run.output)
            print(f"interrupted at step {self.global_step}; "
                  + (f"{kept[-1][1].name} is intact: continue with --resume" if kept else "no checkpoint yet"),
                  file=sys.stderr)
            raise
        finally:
            self.progress.close()  # also before an error's message (e.g. an unreadable image)

    def end_step(self) -> None:
        """After an optimizer step: stop on a non-finite loss; then the log line, checkpoint and validation due."""
        args, accelerator = self.args, self.accelerator
        if float(accelerator.reduce(self.sums[4:], reduction="sum")) > 0:  # every process stops alike
            raise self.diverged(self.global_step + 1, "the loss is not finite")
        if self.rotation_due:
            self.remove_old_checkpoints()
        step_lrs = self.lr_scheduler.get_last_lr()  # the rates this step used
        self.lr_scheduler.step()
        self.global_step += 1
        step = self.global_step
        self.progress.update(1)
        if step % args.log_every == 0 or step == self.total_steps:
            self.log(step, step_lrs)
        if step % args.checkpoint_every == 0:
            self.save_checkpoint(step)
        if args.validate_every and step % args.validate_every == 0:
            self.validate(step)
        if step % args.checkpoint_every == 0 or (args.validate_every and step % args.validate_every == 0):
            self.since_log = (self.since_log[0], time.perf_counter())  # throughput counts training only

    def log(self, step: int, step_lrs: list[float]) -> None:
        """A train_log.jsonl line: the means over every process since the last line."""
        import torch

        totals = self.accelerator.reduce(self.sums, reduction="sum")
        steps, since = self.since_log
        count = max(float(totals[3]), 1.0)
        record = {
            "step": step,
            "epoch": round(step / self.updates_per_epoch, 4),
            "loss": float(totals[0]) / count,
            "mask_loss": float(totals[1]) / count,
            "edge_loss": float(totals[2]) / count,
            "lr": step_lrs[0],
            "bde_lr": step_lrs[-1],
            "images_per_s": (step - steps) * self.images_per_step / max(time.perf_counter() - since, 1e-9),
            "images": self.last_names,  # the last micro-batch of the main process
        }
        if torch.cuda.is_available():
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.run.main_process:
            append_json_line(self.run.output / LOG_FILE, record)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self.sums.zero_()
        self.since_log = (step, time.perf_counter())

    def finish(self) -> TrainResult:
        """The last checkpoint (a finished run can be extended with --resume --max-steps), the last
        validation, and final/: a complete model folder, written in a temporary folder and renamed."""
        from diffdis_core import DiffDISPipeline

        args, run, step = self.args, self.run, self.global_step
        if self.last_saved != step:
            self.save_checkpoint(step)  # (checks the weights)
        self.remove_old_checkpoints()
        if args.validate_every and step % args.validate_every:
            self.validate(step)
        final = run.output / FINAL_DIR
        if run.main_process:
            old = run.output / f".{FINAL_DIR}.old"
            if old.exists():
                shutil.rmtree(old)
            staging = make_temporary_folder(final)
            model = self.accelerator.unwrap_model(self.unet).eval()
            DiffDISPipeline(model, self.vae, self.scheduler, self.embed.cpu()).save_pretrained(staging)
            write_json(staging / "training_args.json", vars(args))
            apply_umask(staging)
            if final.exists():
                os.replace(final, old)
            os.replace(staging, final)
            if old.exists():
                shutil.rmtree(old)
            run.say(f"done: {step} steps; model in {final} (DiffDISPipeline.from_pretrained('{final}', base=None))")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return TrainResult(final, step, self.accelerator.unwrap_model(self.unet))


def train(args: argparse.Namespace) -> TrainResult:
    run = open_run(args)
    data = find_data(run)
    find_resume_point(run, data)
    model = load_model(run)
    edge_folder = prepare_output(run, data)  # the first phase that changes the output folder
    training = Training(run, data, model, edge_folder)
    training.resume()
    training.loop()
    return training.finish()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def train_command() -> int:
        train(args)
        return 0

    return run_main(train_command)


if __name__ == "__main__":
    sys.exit(main())
