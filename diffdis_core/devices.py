"""Choosing a device and dtype: CUDA, Apple MPS, XPU or CPU, never hard-coded.

Light (torch only): the ComfyUI nodes use the same rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import sys
import threading

import torch

from .errors import DiffDISError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ["auto", "fp32", "fp16", "bf16"]

# CPU features that give bfloat16 matrix products in hardware (torch.cpu.get_capabilities() keys).
NATIVE_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")


def check_compiler(device: str | torch.device, turn_off: str = "turn compile off") -> None:
    """torch.compile fails only at the first run, deep inside a model: say up front what is missing.
    ``turn_off``: how the caller's user goes without compiling."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # a torch without this helper: let torch.compile speak for itself
            return
        if not has_triton():
            raise DiffDISError("compile needs Triton on NVIDIA GPUs (pip install triton; on Windows triton-windows): "
                               f"install it or {turn_off}")
    elif device.type == "cpu":
        compilers = (os.environ.get("CXX"), "g++", "c++", "clang++", "cl")
        if any(shutil.which(c) for c in compilers if c):
            return
        raise DiffDISError("compile on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on PATH: "
                           f"install one or {turn_off}")


def channels_last_on(device: str | torch.device) -> bool:
    """Whether convolutions run channels-last on ``device``: faster on CPU (oneDNN) and CUDA (tensor cores)
    with the same results; MPS support for them is patchy. One rule for the loaders and every front end."""
    return torch.device(device).type in ("cpu", "cuda")


def memory_format_on(device: str | torch.device) -> torch.memory_format:
    return torch.channels_last if channels_last_on(device) else torch.contiguous_format


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), as torch reports it.

    Without it bfloat16 is emulated and slower than float32.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # public since torch 2.5
    if get_capabilities is None:
        return False
    capabilities = get_capabilities()
    return any(bool(capabilities.get(feature)) for feature in NATIVE_BF16_CPU_FEATURES)


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The fastest precision that is safe on ``device``.

    - CPU: bfloat16 where the CPU has native bf16 (AMX / AVX512-BF16), else float32.
    - CUDA: bfloat16 on compute capability >= 8 (Ampere and newer), else float16 (the VAE then
      stays float32, see ``vae_dtype``).
    - XPU: bfloat16 where supported, else float16.
    - MPS: float16 (with a float32 VAE); not measured here (no Mac).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.bfloat16 if torch.cuda.get_device_capability(index)[0] >= 8 else torch.float16
    if device.type == "xpu":
        supported = getattr(torch.xpu, "is_bf16_supported", lambda: False)()
        return torch.bfloat16 if supported else torch.float16
    return torch.float16


def pick_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """A dtype from ``auto`` / fp32 / fp16 / bf16 (or float32... or a torch.dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise DiffDISError(f"unknown dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def vae_dtype(dtype: torch.dtype, force_upcast: bool = True) -> torch.dtype:
    """The VAE's dtype for a pipeline in ``dtype``: float32 in float16 when the VAE's config asks
    for it (the SD VAE overflows in float16); bfloat16 has float32's range and needs no upcast."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def vae_force_upcast(vae_config) -> bool:
    """Whether a VAE runs in float32 where the model runs in float16: its config's ``force_upcast``, and
    yes where the config does not say (the SD VAEs overflow in float16). Inference and training both ask here."""
    return bool(vae_config.get("force_upcast", True))


def vae_under_autocast(mixed_precision: str, vae_config) -> bool:
    """Whether a training step's autocast (accelerate's ``mixed_precision``: no, fp16, bf16) may cover the
    VAE too: not where the upcast rule keeps it in float32."""
    dtype = DTYPES.get(mixed_precision)
    return dtype is not None and vae_dtype(dtype, vae_force_upcast(vae_config)) == dtype


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# Within a stage, blocks under 32 MiB (glibc's largest mmap threshold) are kept and reused: a VAE band's
# working copies, the UNet's activations, a feed-forward chunk. Larger ones (the VAE's full-size
# activations) are mapped when asked for and returned when freed, so fragments of them never pile up.
_REUSE = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 2**31 - 1}
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
_allocator_lock = threading.Lock()
_allocator_users = 0


def _glibc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device | str = "cpu"):
    """A pipeline stage's CPU memory policy (glibc Linux; a no-op elsewhere and off the CPU): within the
    block freed blocks under 32 MiB are reused rather than handed back (fewer page faults and zeroed
    pages), and when the block ends, every free page goes back to the OS (``malloc_trim``), so the next
    stage starts from the memory actually in use: the peak of a 1024² image is the largest stage's, not
    the sum of what each left behind (3.32 GiB with the weights, where keeping all freed memory for the
    whole run reached 4.00 GiB, at the same speed within 1%; measured on the 2-core EPYC). Nested blocks
    share the settings; each one's end returns the free pages."""
    global _allocator_users
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield
        return
    with _allocator_lock:
        if _allocator_users == 0:
            for option, value in _REUSE.items():
                libc.mallopt(option, value)
        _allocator_users += 1
    try:
        yield
    finally:
        with _allocator_lock:
            _allocator_users -= 1
            if _allocator_users == 0:
                for option, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(option, value)
            libc.malloc_trim(0)
