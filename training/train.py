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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import this folder as the package it is, from any directory
    _folder = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _folder]  # its modules are not top-level
    sys.path.insert(0, str(_folder.parent))
    __package__ = _folder.name

from diffdis_core.errors import DiffDISError
from diffdis_core.spec import DEFAULT_BASE, UNET_WEIGHTS_NAMES, check_processing_res

from .evaluate import OneLineErrorParser, error_line

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_NAME = re.compile(r"^checkpoint-\d+\.damaged\d*$")
STATE_FILE = "training_state.json"
LOG_FILE = "train_log.jsonl"
VAL_LOG_FILE = "val_log.jsonl"
FINAL_DIR = "final"
# What defines "step N" and the data order: a resumed run must keep these.
RUN_IDENTITY = ("batch_size", "gradient_accumulation_steps", "seed", "num_processes", "train_samples")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description="Train DiffDIS (one-step dichotomous image segmentation) from SD-Turbo.")
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
    g.add_argument("--resolution", type=int, default=1024,
                   help="training size, a multiple of 64 (the SWCI scales must line up; default 1024)")
    g.add_argument("--batch-size", type=int, default=4, help="images per process and step (default 4; even for CutMix)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=3e-5, help="Adam learning rate (default 3e-5)")
    g.add_argument("--bde-lr-scale", type=float, default=10.0, help="lr factor of the BDE projection (default 10)")
    g.add_argument("--lr-decay", type=float, default=0.95, help="lr factor every --lr-decay-epochs (default 0.95)")
    g.add_argument("--lr-decay-epochs", type=int, default=30, help="epochs between lr decays (default 30)")
    g.add_argument("--lr-schedule", choices=["authors", "step"], default="authors",
                   help="authors (default): their code's decay, after epoch e the lr is multiplied by "
                        "decay^(e // 30), which compounds from epoch 30 on; step: lr × decay^(epoch // 30), "
                        "as the paper words it")
    g.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="clip gradients to this norm (default 0: off, as the paper)")
    g.add_argument("--edge-weight", type=float, default=1.0, help="weight of the edge loss (default 1)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--no-crop", action="store_true", help="no random centred crop")
    g.add_argument("--no-rotation", action="store_true", help="no random rotation")
    g.add_argument("--rotation-prob", type=float, default=0.2, help="probability of a rotation (default 0.2)")
    g.add_argument("--no-color-jitter", action="store_true", help="no brightness/contrast/colour/sharpness changes")
    g.add_argument("--no-cutmix", action="store_true", help="no CutMix within pairs")
    g.add_argument("--cutmix-prob", type=float, default=0.5, help="probability of a CutMix box per image (default 0.5)")
    g.add_argument("--no-pyramid-noise", action="store_true", help="plain Gaussian noise instead of pyramid noise")
    g.add_argument("--pyramid-discount", type=float, default=0.8, help="pyramid-noise discount (default 0.8)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation, noise and new layers")
    g = p.add_argument_group("hardware")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: accelerate's config, else no = fp32 as the paper)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls and convolutions on CUDA (default on: faster on Ampere and newer, about "
                        "10 bits of mantissa in those products; --no-tf32 for full fp32 as the paper's setting)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading workers")
    g = p.add_argument_group("logging, checkpoints, validation")
    g.add_argument("--log-every", type=int, default=10, help="steps between train_log.jsonl lines (default 10)")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept, newest first (0: all; default 2)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output that has a run (deletes its checkpoints, logs and final/)")
    g.add_argument("--validate-every", type=int, default=0, help="steps between validations (default 0: none)")
    g.add_argument("--val-dataset", help="dataset for validation (default --dataset)")
    g.add_argument("--val-split", default="DIS-VD", help="validation split (default DIS-VD)")
    g.add_argument("--val-resolution", type=int, default=None,
                   help="validation processing size, a multiple of 64, of 256 with --val-tta (default --resolution)")
    g.add_argument("--val-max-images", type=int, default=None, help="validate on the first N images only")
    g.add_argument("--val-tta", action="store_true", help="validate with the authors' test-time augmentation")
    g.add_argument("--val-hce", action="store_true", help="also compute HCE in validation (slow)")
    return p


def check_args(args: argparse.Namespace) -> None:
    def positive(name: str, value, allow_zero: bool = False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "positive"
            raise DiffDISError(f"--{name.replace('_', '-')} must be {bound}, got {value}")

    check_processing_res(args.resolution, name="--resolution")
    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "max_steps", "log_every", "checkpoint_every",
                 "lr", "lr_decay_epochs"):
        positive(name, getattr(args, name))
    for name in ("keep_checkpoints", "validate_every", "max_grad_norm", "edge_weight", "num_workers", "lr_decay"):
        positive(name, getattr(args, name), allow_zero=True)
    if args.validate_every:
        name = "--val-resolution" if args.val_resolution is not None else "--resolution (the validation size)"
        check_processing_res(args.val_resolution or args.resolution, tta=args.val_tta, name=name)
    if not args.no_cutmix and args.batch_size % 2:
        raise DiffDISError(f"CutMix mixes the images of each pair in a batch: --batch-size must be even "
                           f"(got {args.batch_size}), or pass --no-cutmix")
    for name in ("rotation_prob", "cutmix_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise DiffDISError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
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
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffDISError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DiffDISError(f"{path} is not valid JSON ({error})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or step < 0 or not isinstance(state.get("identity"), dict):
        raise DiffDISError(f"{path} does not hold a training state (a step and the run's settings)")
    return state


def check_checkpoint(folder: Path) -> dict:
    """The checkpoint's training state if all its files are there and whole; otherwise DiffDISError naming
    the first damaged file. Cheap: file headers only (a truncated zip or safetensors file fails here)."""
    from safetensors import safe_open

    state = read_training_state(folder)
    if state["step"] != int(CHECKPOINT_NAME.match(folder.name).group(1)):
        raise DiffDISError(f"{folder / STATE_FILE} is for step {state['step']}, not the folder's step")
    config = folder / "unet" / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiffDISError(f"{config} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DiffDISError(f"{config} is not valid JSON ({error})") from None
    weights = folder / "unet" / UNET_WEIGHTS_NAMES[0]
    if not weights.is_file():
        raise DiffDISError(f"{weights} is missing")
    try:
        with safe_open(weights, "pt"):
            pass
    except Exception as error:  # safetensors raises its own error type for a truncated or garbled file
        raise DiffDISError(f"{weights} is truncated or damaged ({str(error).splitlines()[0]})") from None
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


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint so it is never resumed from again (kept for inspection)."""
    target = folder.with_name(folder.name + ".damaged")
    index = 1
    while target.exists():
        index += 1
        target = folder.with_name(f"{folder.name}.damaged{index}")
    os.replace(folder, target)
    return target


def previous_run_files(output: Path) -> list[Path]:
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir()
                  if CHECKPOINT_NAME.match(p.name) or DAMAGED_NAME.match(p.name)
                  or p.name in (FINAL_DIR, LOG_FILE, VAL_LOG_FILE)
                  or (p.name.startswith(".checkpoint-") and p.name.endswith(".partial")))


def remove_previous_run(output: Path) -> None:
    """--overwrite: delete only what a training run writes (never the edge cache or other files)."""
    for path in previous_run_files(output):
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def append_json_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------- model
def load_training_start(pretrained: str, base: str | None, random_init: bool):
    """(DiffDIS UNet to train, VAE, scheduler, empty-prompt embedding, what was done)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffdis_core import DiffDISUNet
    from diffdis_core.configs import SD_TURBO_SCHEDULER_CONFIG
    from diffdis_core.loading import ModelSources
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
    vae_dir = sources.component("vae")
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise DiffDISError(f"could not load the VAE from {vae_dir} ({str(error).splitlines()[0]})") from None
    scheduler_dir = sources.component("scheduler", required=False)
    # DiffDIS's one-step objective is the epsilon parameterisation whatever the base used (SD 2.1: v).
    scheduler = DDPMScheduler.from_config(
        DDPMScheduler.load_config(scheduler_dir) if scheduler_dir is not None else SD_TURBO_SCHEDULER_CONFIG,
        prediction_type="epsilon")
    embed = sources.empty_embedding(cache=False)  # never writes into the user's model folder
    return unet, vae, scheduler, embed, how


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    final: Path  # the model folder written by the main process
    steps: int
    unet: Any  # this process's trained DiffDISUNet (every rank holds the same weights)


def train(args: argparse.Namespace) -> TrainResult:
    import numpy as np
    import torch
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from diffdis_core import DiffDISPipeline, DiffDISUNet
    from diffdis_core.distributed import make_accelerator
    from diffdis_core.hub import option_names

    from .data import (
        Augmentation,
        CutMixCollate,
        DISTrainDataset,
        EpochShuffleSampler,
        edge_cache_folder,
        find_pairs,
        prepare_edge_maps,
        split_folder,
    )
    from .evaluate import gather_partials, predict_and_score
    from .metrics import combine
    from .recipe import (
        encode_batch,
        gaussian_noise_like,
        lr_multiplier,
        one_step_losses,
        optimizer_param_groups,
        pyramid_noise_like,
    )

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
    main_process = accelerator.is_main_process
    say = tqdm.write if main_process else (lambda *a, **k: None)

    # Data first: a bad dataset should fail before minutes of model loading.
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

    resume_from, resume_state, damaged = choose_checkpoint(output) if args.resume else (None, None, [])
    identity = {"batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "seed": args.seed, "num_processes": accelerator.num_processes, "train_samples": len(train_samples)}
    if resume_state is not None:
        changed = [f"{k} {resume_state['identity'][k]} -> {identity[k]}" for k in RUN_IDENTITY
                   if resume_state["identity"].get(k) != identity[k]]
        if changed:
            raise DiffDISError(f"cannot resume {resume_from}: {', '.join(changed)} would change the data order; "
                               "resume with the same settings or start a new --output")

    if main_process:
        if args.overwrite:
            remove_previous_run(output)
        output.mkdir(parents=True, exist_ok=True)
        for stale in output.glob(".checkpoint-*.partial"):  # a crash mid-save; the checkpoint before it is intact
            shutil.rmtree(stale)
        for folder, problem in damaged:
            aside = set_aside(folder)
            say(f"{problem}: resuming from {resume_from.name} instead (the damaged one is now {aside.name})")
        if args.resume and resume_from is None:
            say(f"no checkpoint in {output}: starting from step 0")
            for log in (LOG_FILE, VAL_LOG_FILE):
                (output / log).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if torch.cuda.is_available():  # TF32 on by default (--no-tf32: full fp32 products, as the paper)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    edge_folder = edge_cache_folder(args.edge_cache or output / "edge_cache", train_folder)
    if main_process:
        made = prepare_edge_maps(train_samples, edge_folder, num_workers=args.num_workers)
        if made:
            say(f"wrote {made} edge map(s) to {edge_folder}")
    accelerator.wait_for_everyone()

    # Seeded here, after everything that may or may not run (the edge maps only on a fresh cache, and only
    # on the main process): the same seed is the same run, on every rank, whatever was cached.
    set_seed(args.seed)  # the new layers' initialisation (BDE projection, SWCI input convs)
    base = None if str(args.base).lower() == "none" else args.base
    with option_names(model="--pretrained ", base="--base "):  # error messages name this script's options
        unet, vae, scheduler, embed, how = load_training_start(args.pretrained, base, args.random_init)
    say(how)
    vae.requires_grad_(False)
    vae.to(accelerator.device)
    pipe = DiffDISPipeline(unet, vae, scheduler, embed)  # for its VAE encoding; sets eval mode
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    embed = embed.to(accelerator.device)
    # fp16 autocast overflows in the SD VAE (its config says force_upcast): keep it in fp32 there.
    vae_autocast = accelerator.mixed_precision == "bf16" or (
        accelerator.mixed_precision == "fp16" and not vae.config.get("force_upcast", False))

    augmentation = Augmentation(flip=not args.no_flip, crop=not args.no_crop, rotation=not args.no_rotation,
                                rotation_prob=args.rotation_prob, color=not args.no_color_jitter,
                                cutmix=not args.no_cutmix, cutmix_prob=args.cutmix_prob)
    dataset = DISTrainDataset(train_samples, edge_folder, args.resolution, augmentation, args.seed)
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.num_workers,
        collate_fn=CutMixCollate(augmentation.cutmix), pin_memory=torch.cuda.is_available(),
        persistent_workers=args.num_workers > 0)
    optimizer = torch.optim.Adam(optimizer_param_groups(unet, args.lr, args.bde_lr_scale))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)

    updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * updates_per_epoch
    num_epochs = math.ceil(total_steps / updates_per_epoch)
    compound = args.lr_schedule == "authors"
    lr_scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer,
        lambda step: lr_multiplier(step // updates_per_epoch, args.lr_decay, args.lr_decay_epochs, compound)))

    def save_hook(models, weights, folder):
        # The UNet goes into unet/ in the released layout instead of accelerate's model.safetensors.
        if main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(Path(folder) / "unet")
        weights.clear()

    def load_hook(models, folder):
        while models:
            model = models.pop()
            loaded = DiffDISUNet.from_pretrained(Path(folder) / "unet", torch_dtype=torch.float32)
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step = 0
    if resume_from is not None:
        # accelerate's own state files (optimizer, scheduler, RNG), written by this script; loaded with
        # weights_only unpickling. The UNet is read from unet/ (safetensors) by load_hook.
        try:
            accelerator.load_state(str(resume_from))
        except Exception as error:  # files that looked whole but do not load (damaged inside)
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DiffDISError(f"could not load {resume_from} ({detail}); move it out of {output} to resume from "
                               "an earlier checkpoint, or start over with --overwrite") from None
        global_step = int(resume_state["step"])
        if main_process:
            for log in (LOG_FILE, VAL_LOG_FILE):
                truncate_log(output / log, global_step)
        say(f"resumed from {resume_from} at step {global_step}")

    total_batch = per_step * args.gradient_accumulation_steps
    say(f"{len(train_samples)} training images, {updates_per_epoch} steps per epoch, {total_steps} steps "
        f"({num_epochs} epochs), {total_batch} images per step ({args.batch_size} × {accelerator.num_processes} "
        f"process(es) × {args.gradient_accumulation_steps}), {args.resolution}², "
        f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}")

    def save_checkpoint(step: int) -> None:
        final, partial = output / f"checkpoint-{step}", output / f".checkpoint-{step}.partial"
        if main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        if main_process:
            state = {"step": step, "epoch": step / updates_per_epoch, "identity": identity,
                     "args": {k: v for k, v in vars(args).items()}}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            if final.exists():  # only when a finished run re-saves its last step
                shutil.rmtree(final)
            os.replace(partial, final)  # atomic: the previous checkpoint stays valid until this one is complete
            if args.keep_checkpoints:
                for _, old in checkpoints_in(output)[: -args.keep_checkpoints]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        val_pipe = DiffDISPipeline(model, vae, scheduler, embed)
        with torch.inference_mode():
            partial = predict_and_score(
                val_pipe, val_samples, processing_res=args.val_resolution or args.resolution, tta=args.val_tta,
                seed=args.seed, hce=args.val_hce, num_workers=min(2, args.num_workers), progress=main_process,
                desc=f"validate {args.val_split}",
                autocast=accelerator.autocast if accelerator.mixed_precision != "no" else None)
        results = combine(gather_partials(partial))
        model.train()
        if main_process:
            record = {"step": step, "epoch": round(step / updates_per_epoch, 4), "split": args.val_split, **results}
            append_json_line(output / VAL_LOG_FILE, record)
            say(f"step {step} {args.val_split}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in results.items() if k != "images"))

    def step_noise_generator(step: int, micro: int) -> torch.Generator:
        # Noise depends only on (seed, step, micro-batch, process): a resumed run draws the same noise.
        entropy = np.random.SeedSequence([args.seed, step, micro, accelerator.process_index]).generate_state(2)
        return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))

    progress = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", disable=not main_process,
                    dynamic_ncols=True)
    sums = torch.zeros(4, device=accelerator.device)  # loss, mask loss, edge loss, micro-batches
    steps_since_log, last_log_time = 0, time.perf_counter()
    last_names: list[str] = []
    micro = 0
    last_saved = global_step if resume_from is not None else None
    first_epoch, skip_batches = divmod(global_step, updates_per_epoch)
    skip_batches *= args.gradient_accumulation_steps
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= total_steps:
                break
            sampler.set_epoch(epoch)
            epoch_loader = loader
            if skip_batches:
                epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
                skip_batches = 0
            epoch_loader.set_epoch(epoch)  # keeps accelerate's own epoch counter in step with ours
            for batch in epoch_loader:
                with accelerator.accumulate(unet):
                    with torch.no_grad(), (accelerator.autocast() if vae_autocast else torch.autocast(
                            accelerator.device.type, enabled=False)):
                        rgb_latents, target = encode_batch(pipe, batch["image"], batch["mask"], batch["edge"])
                    generator = step_noise_generator(global_step, micro)
                    noise = (gaussian_noise_like(target, generator) if args.no_pyramid_noise
                             else pyramid_noise_like(target, args.pyramid_discount, generator))
                    losses = one_step_losses(unet, scheduler, embed, rgb_latents, target, noise, args.edge_weight)
                    accelerator.backward(losses.total)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([losses.total.detach(), losses.mask.detach(), losses.edge.detach(),
                                     torch.ones((), device=sums.device)])
                last_names = list(batch["name"])
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                step_lrs = lr_scheduler.get_last_lr()  # the rates this step used
                lr_scheduler.step()
                global_step += 1
                steps_since_log += 1
                micro = 0
                progress.update(1)

                if global_step % args.log_every == 0 or global_step == total_steps:
                    totals = accelerator.reduce(sums, reduction="sum")
                    elapsed = time.perf_counter() - last_log_time
                    count = max(float(totals[3]), 1.0)
                    record = {
                        "step": global_step,
                        "epoch": round(global_step / updates_per_epoch, 4),
                        "loss": float(totals[0]) / count,
                        "mask_loss": float(totals[1]) / count,
                        "edge_loss": float(totals[2]) / count,
                        "lr": step_lrs[0],
                        "bde_lr": step_lrs[-1],
                        "images_per_s": steps_since_log * total_batch / max(elapsed, 1e-9),
                        "images": last_names,  # the last micro-batch of the main process
                    }
                    if torch.cuda.is_available():
                        record["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    if main_process:
                        append_json_line(output / LOG_FILE, record)
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    sums.zero_()
                    steps_since_log = 0
                    last_log_time = time.perf_counter()
                if global_step % args.checkpoint_every == 0:
                    save_checkpoint(global_step)
                    last_saved = global_step
                    last_log_time = time.perf_counter()  # throughput counts training only
                if args.validate_every and global_step % args.validate_every == 0:
                    validate(global_step)
                    last_log_time = time.perf_counter()
                if global_step >= total_steps:
                    break
    except KeyboardInterrupt:
        progress.close()
        kept = checkpoints_in(output)
        print(f"interrupted at step {global_step}; "
              + (f"{kept[-1][1].name} is intact: continue with --resume" if kept else "no checkpoint yet"),
              file=sys.stderr)
        raise
    finally:
        progress.close()  # also before an error's message (e.g. an unreadable image)

    if last_saved != global_step:
        save_checkpoint(global_step)  # lets a finished run be extended with --resume --max-steps
    if args.validate_every and global_step % args.validate_every:
        validate(global_step)
    final = output / FINAL_DIR
    if main_process:
        staging, old = output / ".final.partial", output / ".final.old"
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        model = accelerator.unwrap_model(unet).eval()
        DiffDISPipeline(model, vae, scheduler, embed.cpu()).save_pretrained(staging)
        (staging / "training_args.json").write_text(json.dumps(vars(args), indent=2), encoding="utf-8")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        if old.exists():
            shutil.rmtree(old)
        say(f"done: {global_step} steps; model in {final} (DiffDISPipeline.from_pretrained('{final}', base=None))")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(final, global_step, accelerator.unwrap_model(unet))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except DiffDISError as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
