"""ComfyUI's services (model folders, memory management, progress, cancel), with plain fallbacks.

Inside ComfyUI the ``comfy`` package and the ``folder_paths`` module are importable and every
function here defers to them. Outside ComfyUI (CI, scripts) the fallbacks keep the nodes usable:
the model folder comes from ``DIFFDIS_MODELS_DIR`` (or ``./models/diffdis``), the model is moved to
the chosen device directly, progress and cancel are no-ops.

ComfyUI modules are looked up on every call (they are cached in ``sys.modules`` anyway), so this
module imports nothing of ComfyUI's at import time and tests can swap them in.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

CATEGORY = "image/segmentation/DiffDIS"  # one menu entry for all DiffDIS nodes
FOLDER_NAME = "diffdis"  # ComfyUI/models/diffdis
MODELS_DIR_ENV = "DIFFDIS_MODELS_DIR"  # the models folder(s) when running without ComfyUI

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError,)


def comfy_module(name: str) -> ModuleType | None:
    """ComfyUI's module ``name`` (``folder_paths``, ``comfy.model_management``...), or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


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
def choose_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for the Load DiffDIS ``device`` option: ``auto`` follows
    ComfyUI (its GPU, and where it parks unused models), ``cpu`` keeps everything on the CPU."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    if device != "auto":
        raise ValueError(f"device must be auto or cpu, got {device!r}")
    management = comfy_module("comfy.model_management")
    if management is not None:
        return management.get_torch_device(), management.unet_offload_device()
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.device("cpu")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu"), torch.device("cpu")
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.device("cpu")
    return torch.device("cpu"), torch.device("cpu")


def choose_dtype(precision: str, load_device: torch.device) -> torch.dtype:
    """``auto``: what ComfyUI would pick for a UNet on that device (its --fp16-unet etc. flags
    included); without ComfyUI, float16 on accelerators and float32 on the CPU."""
    if precision in PRECISIONS:
        return PRECISIONS[precision]
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    management = comfy_module("comfy.model_management")
    if management is not None:
        dtype = management.unet_dtype(device=load_device,
                                      supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
        if dtype in PRECISIONS.values():
            return dtype
        # fp8 flags are for ComfyUI's own model classes; this UNet computes in 16 bits at least.
    return torch.float32 if load_device.type == "cpu" else torch.float16


def intermediate_device() -> torch.device:
    """Where results between nodes live (the CPU unless ComfyUI runs with --gpu-only)."""
    management = comfy_module("comfy.model_management")
    return management.intermediate_device() if management is not None else torch.device("cpu")


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
