"""The core's cutout (``diffdis_core.cutout.cutout_rgba``) on ComfyUI tensors, for Apply Alpha and Remove
Background: a mask predicted at the processing size brought to a larger image along its edges, and the
subject's own colours under a soft alpha.

Only layouts are converted here (IMAGE [B, H, W, 3] and MASK [B, H, W] to the core's [B, C, H, W]);
frames run in chunks that fit in the device's memory, with progress and Cancel, like the model's stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffdis_core.cutout import cutout_rgba
from diffdis_core.matting import refines_edges

from . import batching, services

# Peak working memory per frame, float32, measured (RSS) on 1080p and 4K frames: estimate_foreground
# about 40 bytes per image pixel, refine_alpha about 20 plus about 350 per pixel of the processing size
# (its fit at the mask's size); the frame, alpha and colours moved to the device and back add about 30.
BYTES_PER_PIXEL = 72
BYTES_PER_PROCESSING_PIXEL = 384

# The options, on Apply Alpha and Remove Background alike, and what people search for them by.
SEARCH_ALIASES = ["decontaminate", "color spill", "colour spill", "halo", "fringe", "refine edges",
                  "refine foreground"]
REFINE_FOREGROUND_TOOLTIP = (
    "Where the mask is soft (hair, fur, motion blur, glass) the image's pixels mix the subject with the old "
    "background, which then shows as a fringe on a new one. On: those colours are replaced by the subject's own, "
    "estimated from the image (colour decontamination); where the mask is 1 the pixels are kept. Off: the image's "
    "pixels as they are.")
REFINE_EDGES_TOOLTIP = (
    "For images larger than processing_res: the mask, predicted at processing_res and stretched to the image, is "
    "re-fitted to the image's own edges at full resolution (1-pixel hairs stay 1 pixel wide instead of a grey "
    "smear). Nothing changes for images not larger than processing_res.")


def frame_bytes(size: tuple[int, int], processing_res: int, edges: bool) -> int:
    """Working memory of the refinements of one frame of ``size``; ``edges``: with refine_alpha."""
    return BYTES_PER_PIXEL * size[0] * size[1] + (BYTES_PER_PROCESSING_PIXEL * processing_res ** 2 if edges else 0)


def refine_cutouts(rgb: torch.Tensor, mask: torch.Tensor, processing_res: int, refine_edges: bool,
                   refine_foreground: bool, device: torch.device,
                   adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The colours [B, H, W, 3] and alpha [B, H, W] of the cutouts of ``rgb`` [B, H, W, 3] under ``mask``
    [B, h, w] (one per frame, any size; predicted at ``processing_res``²), on ComfyUI's intermediate device:
    the core's ``cutout_rgba`` (``adjust``: a MASK -> MASK step such as Apply Alpha's threshold, invert, grow
    and feather, ``tensors.refine_mask``). Runs on ``device``; ``progress.update(n)`` after every n frames.
    """
    size = tuple(rgb.shape[1:3])
    predicted_at = (processing_res, processing_res)
    edges = refine_edges and refines_edges(size, predicted_at)
    alpha_step = (lambda alpha: adjust(alpha[:, 0])[:, None]) if adjust is not None else None
    keep_on = services.intermediate_device()

    def cutout_part(start: int, stop: int, on: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = rgb[start:stop].to(on).movedim(-1, 1).contiguous()
        colours, alpha = cutout_rgba(pixels, mask[start:stop, None].to(on), refine_edges=edges,
                                     refine_foreground=refine_foreground, adjust=alpha_step, predicted_at=predicted_at)
        if progress is not None:
            progress.update(stop - start)
        colours = colours.movedim(1, -1) if refine_foreground else rgb[start:stop]
        return colours.to(keep_on), alpha[:, 0].to(keep_on)

    if not edges and not refine_foreground:  # nothing for the matting: resize and adjust where the frames are
        return cutout_part(0, rgb.shape[0], rgb.device)
    per_frame = frame_bytes(size, processing_res, edges)
    services.make_room(per_frame, device)
    parts = batching.run_in_chunks(rgb.shape[0], batching.chunk_size(per_frame, device),
                                   lambda start, stop: cutout_part(start, stop, device))
    colours, alphas = zip(*parts, strict=True)
    return torch.cat(colours), torch.cat(alphas)
