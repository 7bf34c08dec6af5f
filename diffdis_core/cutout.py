"""The cutout: an image and its predicted mask -> the colours and alpha of an RGBA cutout.

``cutout_rgba`` is the one implementation: the command line, ComfyUI's Apply Alpha, DiffDIS Remove
Background and BACKGROUND_REMOVAL model, and the pipeline's ``refine_edges`` all call it, so the same
image and settings give the same cutout everywhere. In this order:

1. the mask is brought to the image's size: along the image's edges (``matting.refine_alpha``) when
   ``refine_edges`` and the image is larger than the size the mask was predicted at
   (``matting.refines_edges``), else bilinearly (``image_io.resize``);
2. ``adjust`` (threshold, invert, grow / shrink, feather: ``adjust_alpha``) on that full-size alpha;
3. with ``refine_foreground``, the colours are the foreground's estimated under that final alpha
   (``matting.estimate_foreground``), else the image's own.

Plain torch; no diffusers (the ComfyUI nodes import it at start-up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import DiffDISError
from .image_io import map_to_uint8, resize
from .matting import estimate_foreground, refine_alpha, refines_edges

# The defaults of every cutout front end (the pipeline's own maps stay the authors': refine_edges=False).
REFINE_EDGES = True
REFINE_FOREGROUND = True


def cutout_rgba(image: torch.Tensor, mask: torch.Tensor, *, refine_edges: bool = REFINE_EDGES,
                refine_foreground: bool = REFINE_FOREGROUND,
                adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
                predicted_at: tuple[int, int] | None = None,
                as_uint8: bool = False, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The colours ``[B, 3, H, W]`` and straight (not premultiplied) alpha ``[B, 1, H, W]`` of the cutouts
    of ``image`` ``[B, 3, H, W]`` (float in [0, 1], or uint8) under ``mask`` ``[B, 1, h, w]`` (float,
    foreground = 1, any size), in the order of the module's docstring.

    ``predicted_at``: (height, width) the mask was predicted at, for a mask enlarged since (a ComfyUI
    MASK at the image's size); by default the mask's own size. ``adjust``: a step on the full-size alpha
    ``[B, 1, H, W]`` before the colours, such as ``adjust_alpha``.

    ``as_uint8``, the memory strategy for huge images: both results as uint8, the colours being the
    input itself when they are not estimated (no copy of a uint8 image), no full-size float copy of the
    image (the refinements read it in bands), and a plain cutout's alpha resized in bands straight to 8
    bits (no full-size float map). Otherwise float results (float32 for
    a uint8 image, else the image's dtype). The two agree to the 8-bit rounding. Same device as ``image``.
    ``in_place`` (with ``as_uint8``, a uint8 image): estimated colours are written over ``image`` itself
    (one full-size copy less: 0.3 GiB for a 108-megapixel photo); the caller's image is changed.
    """
    _check_inputs(image, mask)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    predicted = tuple(predicted_at) if predicted_at is not None else tuple(mask.shape[-2:])
    edges = refine_edges and refines_edges(size, predicted)
    # as_uint8: no full-size float colours (12 bytes a pixel for a uint8 image); the matting steps read the
    # image itself in bands.
    colours = image if as_uint8 else _to_unit_float(image)
    if edges:
        alpha = refine_alpha(colours, mask, predicted_at)
    elif as_uint8 and adjust is None and not refine_foreground:
        alphas = [torch.from_numpy(map_to_uint8(m, size)) for m in mask]
        return _to_uint8(image, in_place=False), torch.stack(alphas)[:, None].to(image.device)
    else:
        alpha = resize(mask.float(), size).clamp(0, 1)
        alpha = alpha.to(image.dtype) if image.is_floating_point() else alpha
    if adjust is not None:
        alpha = adjust(alpha)
    over_image = in_place and as_uint8 and image.dtype == torch.uint8
    rgb = estimate_foreground(colours, alpha, over_image) if refine_foreground else (image if as_uint8 else colours)
    if as_uint8:  # in place where the values are this function's own (no second full-size float copy)
        return _to_uint8(rgb, in_place=rgb is not image), _to_uint8(alpha, in_place=True)
    return rgb, alpha


def adjust_alpha(alpha: torch.Tensor, threshold: float = 0.0, invert: bool = False, grow: int = 0,
                 feather: int = 0) -> torch.Tensor:
    """``alpha`` ``[B, 1, H, W]`` thresholded (above 0: 1 where it is at least ``threshold``, else 0),
    inverted (to keep the background instead), its kept region grown (``grow`` > 0) or shrunk (< 0) by
    that many pixels, then its edge feathered with a Gaussian of radius ``feather``."""
    if threshold > 0:
        alpha = (alpha >= threshold).to(alpha.dtype)
    if invert:
        alpha = 1 - alpha
    return _feather(_grow(alpha, grow), feather)


def _grow(alpha: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grey dilation (> 0) or erosion (< 0) with a square."""
    if pixels == 0:
        return alpha
    size = 2 * abs(pixels) + 1
    x = alpha if pixels > 0 else -alpha
    x = F.max_pool2d(x, kernel_size=size, stride=1, padding=abs(pixels))
    return x if pixels > 0 else -x


def _feather(alpha: torch.Tensor, radius: int) -> torch.Tensor:
    """A Gaussian blur of the given radius (sigma = radius / 2), edges extended."""
    if radius <= 0:
        return alpha
    sigma = radius / 2
    offsets = torch.arange(-radius, radius + 1, dtype=alpha.dtype, device=alpha.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(alpha, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.clamp(0, 1)


def _check_inputs(image: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or not (image.is_floating_point() or image.dtype == torch.uint8) \
            or image.ndim != 4 or image.shape[1] != 3 or 0 in image.shape:
        got = f"{list(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise DiffDISError(f"cutout_rgba: image must be [B, 3, H, W], float in [0, 1] or uint8, got {got}")
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.ndim != 4 or mask.shape[1] != 1 \
            or 0 in mask.shape:
        got = f"{list(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DiffDISError(f"cutout_rgba: mask must be a float tensor [B, 1, h, w] in [0, 1], got {got}")
    if mask.shape[0] != image.shape[0]:
        raise DiffDISError(f"cutout_rgba: image and mask batches differ ({image.shape[0]} and {mask.shape[0]})")
    if mask.device != image.device:
        raise DiffDISError(f"cutout_rgba: image is on {image.device} but mask on {mask.device}")


def _to_unit_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255) if image.dtype == torch.uint8 else image


def _to_uint8(x: torch.Tensor, in_place: bool) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    x = x.clamp_(0, 1) if in_place else x.clamp(0, 1)
    return x.mul_(255).round_().to(torch.uint8)
