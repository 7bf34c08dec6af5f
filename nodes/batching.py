"""Running a batch (e.g. video frames) through a stage in chunks that fit in memory and time.

Memory: like ComfyUI's own VAE, estimate the bytes one image needs, ask how much memory is free on
the device, and take at most as many images as fit; a chunk that still runs out of memory is split
in half and retried. Time: the first chunk is one image, and later chunks hold as many images as
run in about ``TARGET_CHUNK_SECONDS``, so progress moves and Cancel (checked before every
convolution, see ``services.cancellable``) lands within seconds on a CPU too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from diffdis_core import spec

from . import services

T = TypeVar("T")

MAX_CHUNK = 32  # more images per call rarely helps
# Wall time a chunk aims at (None: chunks by memory only). One convolution of a chunk is a small part
# of it, and that is how long Cancel can take.
TARGET_CHUNK_SECONDS: float | None = 2.0
TTA_MAX_SCALE = max(scale for _, scale in spec.TTA_VIEWS)  # the largest test-time-augmentation view

# ComfyUI's estimates for the SD AutoencoderKL (comfy/sd.py), bytes per pixel per byte of dtype.
VAE_ENCODE_BYTES_PER_PIXEL = 1767
VAE_DECODE_BYTES_PER_PIXEL = 2178
# ComfyUI's SD UNet estimate (comfy/model_base.py memory_required): MiB per latent pixel and dtype byte.
UNET_MIB_PER_LATENT_PIXEL = 0.01


def encode_bytes(processing_res: int, vae_dtype: torch.dtype) -> int:
    """One image's VAE encodes (full size first, then 1/2, 1/4, 1/8: the first is the peak)."""
    return VAE_ENCODE_BYTES_PER_PIXEL * processing_res ** 2 * services.dtype_size(vae_dtype)


def segment_bytes(processing_res: int, dtype: torch.dtype, vae_dtype: torch.dtype, tta: bool) -> int:
    """One image's UNet call (mask and edge streams: a batch of two); with TTA also the re-encoding
    of the largest view."""
    side = math.ceil(processing_res * (TTA_MAX_SCALE if tta else 1.0))
    latent_pixels = 2 * (side // 8) ** 2
    unet = int(latent_pixels * services.dtype_size(dtype) * UNET_MIB_PER_LATENT_PIXEL * (1 << 20))
    return max(unet, encode_bytes(side, vae_dtype)) if tta else unet


def decode_bytes(processing_res: int, vae_dtype: torch.dtype, tta: bool) -> int:
    """One image's VAE decode: the core decodes one map per image at a time (the masks, then the edges,
    of each draw and view), so the edge, ensembling and TTA add nothing to the peak."""
    side = math.ceil(processing_res * (TTA_MAX_SCALE if tta else 1.0))
    return VAE_DECODE_BYTES_PER_PIXEL * side ** 2 * services.dtype_size(vae_dtype)


def chunk_size(bytes_per_image: int, device: torch.device) -> int:
    return max(1, min(MAX_CHUNK, services.free_memory(device) // max(1, bytes_per_image)))


def run_in_chunks(count: int, max_chunk: int, work: Callable[[int, int], T]) -> list[T]:
    """``work(start, stop)`` over ``range(count)`` in chunks of at most ``max_chunk`` items (memory),
    sized by the time the items so far took (``TARGET_CHUNK_SECONDS``)."""
    results: list[T] = []
    chunk = max_chunk if TARGET_CHUNK_SECONDS is None else 1
    start = 0
    seconds = 0.0  # time taken by the items done so far
    while start < count:
        services.check_interrupted()
        stop = min(start + chunk, count)
        began = time.perf_counter()
        try:
            results.append(work(start, stop))
        except services.OUT_OF_MEMORY:
            if stop - start == 1:
                raise  # ComfyUI reports out-of-memory with its own advice (unload models, lower sizes)
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:
            # Retried outside the except block, so the failed chunk's tensors can be freed first.
            max_chunk = chunk = max(1, (stop - start) // 2)
            services.empty_cache()
            continue
        seconds += time.perf_counter() - began
        start = stop
        if TARGET_CHUNK_SECONDS is not None:
            per_item = seconds / start
            chunk = int(TARGET_CHUNK_SECONDS // per_item) if per_item > 0 else max_chunk
        chunk = max(1, min(chunk, max_chunk))
    return results


# ---------------------------------------------------------------------------- chunks of core results
# DiffDISLatents are rebuilt with type(x)(...) so this module need not import the core.
def slice_latents(latents, start: int, stop: int, device: torch.device | None = None):
    """Images ``start:stop`` of a DiffDISLatents (each view holds [draws, B, 4, h, w])."""
    views = [type(view)(view.mask_latents[:, start:stop].to(device=device),
                        view.edge_latents[:, start:stop].to(device=device), view.flip, view.scale)
             for view in latents.views]
    return type(latents)(views, list(latents.sizes[start:stop]), latents.processing_res)


def concat_latents(parts: list):
    first = parts[0]
    views = [type(view)(torch.cat([p.views[i].mask_latents for p in parts], dim=1),
                        torch.cat([p.views[i].edge_latents for p in parts], dim=1), view.flip, view.scale)
             for i, view in enumerate(first.views)]
    return type(first)(views, [size for p in parts for size in p.sizes], first.processing_res)
