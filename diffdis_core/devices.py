"""Choosing a device and dtype: CUDA, Apple MPS, XPU or CPU, never hard-coded."""

from __future__ import annotations

import ctypes
import platform
import sys

import torch

from .errors import DiffDISError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then XPU, then Apple MPS, then CPU; otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise DiffDISError(f"device {name!r} is not usable here ({str(error).splitlines()[0]}); "
                           "use auto or cpu") from None
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on accelerators (half the memory and time), float32 on CPU (where half is slow)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise DiffDISError(f"unknown dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (process-wide).

    A CPU inference allocates hundreds of fresh 50-500 MB activations; by default each comes from a
    new mmap, whose every page faults and is zeroed by the kernel on first touch: 15-20% of the run.
    Reusing the heap removes that, at the price of the process keeping its peak memory until it
    exits, so it is for short-lived processes (the command line), not servers such as ComfyUI.
    Returns whether it applied (glibc Linux only).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
