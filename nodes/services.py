"""ComfyUI's services (model folders, memory management, progress, cancel), with plain fallbacks.

Inside ComfyUI the ``comfy`` package and the ``folder_paths`` module are importable and every
function here defers to them. Outside ComfyUI (CI, scripts) the fallbacks keep the nodes usable:
the model folder comes from ``DIFFDIS_MODELS_DIR`` (or ``./models/diffdis``), the model is moved to
the chosen device directly, progress and cancel are no-ops.

ComfyUI modules are looked up on every call (they are cached in ``sys.modules`` anyway), so this
module imports nothing of ComfyUI's at import time and tests can swap them in.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# The core's light modules (no diffusers): the same device and precision rules as the CLI.
from diffdis_core import devices, spec

CATEGORY = "image/segmentation/DiffDIS"  # one menu entry for all DiffDIS nodes
# What people type into the node search for this family (each node adds its own words).
SEARCH_ALIASES = ["diffdis", "remove background", "background removal", "rembg", "cutout", "matting",
                  "segmentation", "alpha", "mask", "DIS", "dichotomous image segmentation"]
DEFAULT_PROCESSING_RES = spec.DEFAULT_PROCESSING_RES  # the nodes' name for it (their default arguments use it)


def processing_res_input(tooltip: str) -> tuple[str, dict]:
    """The processing_res widget of every node that takes one: multiples of 64 up to the core's limit."""
    return ("INT", {"default": DEFAULT_PROCESSING_RES, "min": spec.PROCESSING_MULTIPLE,
                    "max": spec.MAX_PROCESSING_RES, "step": spec.PROCESSING_MULTIPLE, "tooltip": tooltip})


FOLDER_NAME = "diffdis"  # ComfyUI/models/diffdis
MODELS_DIR_ENV = "DIFFDIS_MODELS_DIR"  # the models folder(s) when running without ComfyUI

OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError,)


def comfy_module(name: str) -> ModuleType | None:
    """ComfyUI's module ``name`` (``folder_paths``, ``comfy.model_management``...), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def register_prompt_handler(handler: Any) -> bool:
    """Have ComfyUI's server pass every prompt queued through POST /prompt to ``handler`` first
    (``PromptServer.add_on_prompt_handler``), once. False outside a ComfyUI server."""
    server = sys.modules.get("server")  # ComfyUI's, started before custom nodes load; never imported here
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    handlers = getattr(instance, "on_prompt_handlers", None)
    if instance is None or not isinstance(handlers, list) or handler in handlers:
        return False
    instance.add_on_prompt_handler(handler)
    return True


# ---------------------------------------------------------------------------- model folders
def register_model_folder() -> None:
    """Add ComfyUI/models/diffdis to ``folder_paths`` without dropping paths that
    ``extra_model_paths.yaml`` already registered for ``diffdis`` (it is read before custom nodes)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    # add_model_folder_path keeps existing entries and their order; is_default=False appends.
    folder_paths.add_model_folder_path(FOLDER_NAME, default, is_default=False)


def model_roots() -> list[Path]:
    """The folders that hold DiffDIS model folders, the download target first."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        register_model_folder()
        return [Path(p) for p in folder_paths.get_folder_paths(FOLDER_NAME)]
    configured = os.environ.get(MODELS_DIR_ENV)
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    return [Path.cwd() / "models" / FOLDER_NAME]


# ---------------------------------------------------------------------------- device and dtype
# ComfyUI flags that state a precision for diffusion models: with one of them ComfyUI has an opinion.
PRECISION_FLAGS = ("fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "force_fp32", "force_fp16")


def choose_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for the Load DiffDIS ``device`` option: ``auto`` follows
    ComfyUI (its GPU, and where it parks unused models), ``cpu`` keeps everything on the CPU.
    Without ComfyUI, ``auto`` is the core's choice (diffdis_core.devices)."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    management = comfy_module("comfy.model_management")
    if management is not None:
        return management.get_torch_device(), management.unet_offload_device()
    return devices.pick_device("auto"), torch.device("cpu")


def comfy_has_precision_opinion() -> bool:
    """Whether ComfyUI was started with a precision flag (--fp16-unet, --force-fp32...)."""
    cli_args = comfy_module("comfy.cli_args")
    args = getattr(cli_args, "args", None)
    return any(getattr(args, flag, False) for flag in PRECISION_FLAGS)


def choose_dtype(precision: str, load_device: torch.device, model_params: int) -> torch.dtype:
    """The UNet's dtype for the Load DiffDIS ``precision`` option.

    ``auto`` asks ComfyUI (with the model's real parameter count, so its memory heuristics apply, and
    the core's preferred dtype first) on GPUs or when a precision flag was given; on the CPU without
    such a flag ComfyUI's answer is a blanket float32, so the core's rule decides (bfloat16 where the
    CPU has native bf16, else float32). Without ComfyUI: the core's rule.
    """
    if precision != "auto":
        return devices.pick_dtype(precision, load_device)
    preferred = devices.auto_dtype(load_device)
    management = comfy_module("comfy.model_management")
    if management is None or (load_device.type == "cpu" and not comfy_has_precision_opinion()):
        return preferred
    supported = [preferred] + [d for d in (torch.bfloat16, torch.float16, torch.float32) if d != preferred]
    dtype = management.unet_dtype(device=load_device, model_params=model_params, supported_dtypes=supported)
    # fp8 / fp64 flags are for ComfyUI's own model classes; this UNet computes in 16 or 32 bits.
    return dtype if dtype in supported else preferred


def intermediate_device() -> torch.device:
    """Where results between nodes live (the CPU unless ComfyUI runs with --gpu-only)."""
    management = comfy_module("comfy.model_management")
    return management.intermediate_device() if management is not None else torch.device("cpu")


def intermediate_dtype() -> torch.dtype:
    """The dtype of IMAGE / MASK results between nodes (ComfyUI >= 0.21 may use float16)."""
    management = comfy_module("comfy.model_management")
    return getattr(management, "intermediate_dtype", lambda: torch.float32)()


# ---------------------------------------------------------------------------- memory
def model_patcher(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> Any:
    """A ``comfy.model_patcher.ModelPatcher`` for ``model``, or None outside ComfyUI."""
    patcher_module = comfy_module("comfy.model_patcher")
    if patcher_module is None:
        return None
    return patcher_module.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_model(patcher: Any, memory_required: int) -> None:
    """Put the patched model on its load device through ComfyUI, which first frees other models
    as needed to leave ``memory_required`` bytes for inference. The DiffDIS modules are plain
    PyTorch (no ComfyUI cast layers), so they are always loaded whole."""
    management = comfy_module("comfy.model_management")
    management.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)


def free_memory(device: torch.device) -> int:
    """Bytes available for inference on ``device``."""
    management = comfy_module("comfy.model_management")
    if management is not None:
        return int(management.get_free_memory(device))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 4 << 30


def make_room(memory_required: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models if ``device`` (a GPU) lacks ``memory_required`` free bytes for
    work outside any model (the cutout refinements). The CPU is left alone: nothing is unloaded for RAM."""
    management = comfy_module("comfy.model_management")
    if management is not None and device.type != "cpu":
        management.free_memory(memory_required, device)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def empty_cache() -> None:
    management = comfy_module("comfy.model_management")
    if management is not None:
        management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- progress and cancel
class _NoProgress:
    def __init__(self, total: int):
        self.total = total
        self.current = 0

    def update(self, value: int) -> None:
        self.current = min(self.total, self.current + value)


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar for the running node (``update(n)`` adds n), or a silent counter."""
    utils = comfy_module("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _NoProgress(total)


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    management = comfy_module("comfy.model_management")
    if management is not None:
        management.throw_exception_if_processing_interrupted()


def _check_before_convolution(module, args) -> None:
    check_interrupted()  # looked up on each call, so tests can replace it


def _convolutions(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The Conv2d layers of ``module``, except inside torch.compile'd parts (a hook added after
    compiling would force a recompile)."""
    compiled = {id(layer) for part in module.modules() if getattr(part, "_compiled_call_impl", None) is not None
                for layer in part.modules()}
    return [layer for layer in module.modules() if isinstance(layer, torch.nn.Conv2d) and id(layer) not in compiled]


@contextlib.contextmanager
def cancellable(*modules: torch.nn.Module) -> Iterator[None]:
    """Honour Cancel inside ``modules``' forward passes: before every convolution (the bulk of the
    work), not only between UNet calls or chunks. One 1024² VAE decode on a CPU takes many seconds;
    one of its convolutions a fraction of one. The hooks are removed on leaving."""
    hooks = [layer.register_forward_pre_hook(_check_before_convolution)
             for module in modules for layer in _convolutions(module)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
