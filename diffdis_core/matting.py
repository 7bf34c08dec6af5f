"""Cutouts that survive a new background.

- ``estimate_foreground(image, alpha)``: the foreground colours under a soft alpha (hair, blur, glass), so the
  old background does not show as a fringe on a new one (colour decontamination).
- ``refine_alpha(image, alpha)``: a low-resolution mask brought to the image's size along the image's edges
  instead of bilinearly smeared.

Both are steps of the cutout, ``diffdis_core.cutout.cutout_rgba``, which every front end calls.

Plain torch, on any device; float tensors ``[B, C, H, W]`` in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import DiffDISError
from .image_io import resize as _resize
from .image_io import resize_banded

_WORK_DTYPE = torch.float32  # half precision would lose the small weights and variances, on every device

# estimate_foreground: the multi-level method of Germer et al. (2020), "Fast Multi-Level Foreground
# Estimation": their smoothness weights (regularisation + |alpha gradient|) and coarse-to-fine levels.
# Each level is solved by Jacobi sweeps (vectorised) instead of their Gauss-Seidel sweeps (a loop over
# pixels). Jacobi converges about half as fast per sweep, so the levels get more sweeps: twice their 10 on
# the smallest ones, 8 (their 2) on the others, where colour must travel furthest, but only 3 on the full
# size, which only sharpens and costs most. On benchmarks/cutout.py this ends 4-12 % more accurate than
# their method and, skipping what needs no work, faster.
_REGULARIZATION = 1e-5
_GRADIENT_WEIGHT = 1.0
_SMALL_SIDE = 32  # levels up to this size get _SMALL_SWEEPS
_SMALL_SWEEPS = 20
_SWEEPS = 8
_TOP_SWEEPS = 3  # the full-size level
# Levels are relaxed tile by tile, only where alpha is soft or changes; a run of up to _RUN_TILES neighbouring
# tiles at a time (longer runs mean fewer, larger operations). Accelerators take larger tiles: they gain
# little from skipping and much from fewer kernel launches.
_TILE = 64
_TILE_ACCELERATOR = 512
_RUN_TILES = 32
_CHANNELWISE_PIXELS = 1 << 24  # 16.8 megapixels and more: one colour channel at a time
# The full-size level, the levels more than two bands tall (and refine_alpha's full-size maps) are worked on
# in bands of rows of about this many pixels (a 12000-pixel-wide photo: 320 rows, ~0.1 GB of float maps at a
# time). Half of 1 << 23 took a 108-megapixel cutout under 4 GiB at the same speed (27.2-28.7 s vs 22.3-27.9).
_BAND_PIXELS = 1 << 22


def _check_maps(image: torch.Tensor, alpha: torch.Tensor, caller: str, same_size: bool,
                allow_uint8: bool = False) -> None:
    for name, value, channels in (("image", image, 3), ("alpha", alpha, 1)):
        eight_bit = allow_uint8 and name == "image" and isinstance(value, torch.Tensor) and value.dtype == torch.uint8
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or eight_bit):
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            what = "a float tensor in [0, 1] or uint8" if allow_uint8 and name == "image" else "a float tensor in [0, 1]"
            raise DiffDISError(f"{caller}: {name} must be {what}, got {kind}")
        if value.ndim != 4 or value.shape[1] != channels or 0 in value.shape:
            raise DiffDISError(f"{caller}: {name} must be [B, {channels}, H, W], got shape {list(value.shape)}")
    if alpha.shape[0] != image.shape[0]:
        raise DiffDISError(f"{caller}: image and alpha batches differ ({image.shape[0]} and {alpha.shape[0]})")
    if same_size and alpha.shape[-2:] != image.shape[-2:]:
        raise DiffDISError(f"{caller}: alpha must have the image's size {list(image.shape[-2:])}, "
                           f"got {list(alpha.shape[-2:])}")
    if alpha.device != image.device:
        raise DiffDISError(f"{caller}: image is on {image.device} but alpha on {alpha.device}")


def estimate_foreground(image: torch.Tensor, alpha: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The foreground colours ``[B, 3, H, W]`` of ``image`` ``[B, 3, H, W]`` under ``alpha`` ``[B, 1, H, W]``.

    Solves ``image = alpha * F + (1 - alpha) * B`` for smooth F and B (Germer et al.'s multi-level method),
    so that where alpha is soft the old background's colour is taken out. Where alpha is 1 the image is
    returned unchanged; where it is 0 the colours are a smooth continuation of the nearby foreground.
    Same device and dtype as ``image``; a uint8 image (0-255) gives uint8 colours, the float ones rounded,
    without a full-size float copy (the full size is solved in bands of rows). ``in_place`` (uint8 images):
    the colours are written over ``image`` itself, which is returned (no second full-size copy).
    """
    _check_maps(image, alpha, "estimate_foreground", same_size=True, allow_uint8=True)
    if in_place and image.dtype != torch.uint8:
        raise DiffDISError("estimate_foreground: in_place needs a uint8 image")
    channels = image.shape[1]
    # The colour channels are independent systems: large images are solved one channel at a time (the same
    # result, a third of the working memory), small ones all at once (fewer, larger operations).
    group = 1 if image.shape[-2] * image.shape[-1] >= _CHANNELWISE_PIXELS else channels
    out_dtype = torch.uint8 if image.dtype == torch.uint8 else _WORK_DTYPE
    foreground = image if in_place else torch.empty(image.shape, dtype=out_dtype, device=image.device)
    for first in range(0, channels, group):
        _solve_levels(image[:, first:first + group], alpha, foreground[:, first:first + group])
    return foreground.to(image.dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1] (uint8 divided by 255)."""
    return x.to(_WORK_DTYPE).div_(255) if x.dtype == torch.uint8 else x.to(_WORK_DTYPE)


def _solve_levels(image: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> None:
    """The foreground colours of ``image`` [B, C, H, W] (float or uint8) from the coarsest level to the full
    size, written to ``out`` (its dtype: float or uint8, rounded) where alpha is not 1, else the image's.
    ``out`` may be ``image`` itself."""
    height, width = image.shape[-2:]
    sizes = _level_sizes(height, width)
    both = None  # the foreground and background colours of the previous level, [B, 2C, h, w]
    for h, w in sizes[:-1]:
        sweeps = _level_sweeps(h, w, height, width)
        if both is not None and h > 2 * _band_rows(w, image.device):  # a large level: in bands, as the full size
            level = torch.empty(*both.shape[:2], h, w, dtype=_WORK_DTYPE, device=image.device)

            def keep(top: int, bottom: int, band_image, band_alpha, band_both, level=level) -> None:
                level[..., top:bottom, :] = band_both
            _relax_in_bands(image, alpha, both, (h, w), sweeps, keep)
            both = level
            continue
        level_image = _unit(_resize_nearest(image, h, w))
        level_alpha = _resize_nearest(alpha, h, w).to(_WORK_DTYPE).clamp(0, 1)
        both = level_image.repeat(1, 2, 1, 1) if both is None else F.interpolate(both, size=(h, w), mode="nearest")
        _relax_level(level_image, level_alpha, both, sweeps)
    n = image.shape[1]

    def colours(top: int, bottom: int, band_image, band_alpha, band_both) -> None:
        values = torch.where(band_alpha == 1, band_image, band_both[:, :n])
        if out.dtype == torch.uint8:
            values = values.clamp_(0, 1).mul_(255).round_()
        out[..., top:bottom, :] = values
    _relax_in_bands(image, alpha, both, (height, width), _level_sweeps(height, width, height, width), colours)


def _band_rows(width: int, device: torch.device) -> int:
    tile = _TILE if device.type == "cpu" else _TILE_ACCELERATOR
    return max(1, _BAND_PIXELS // (width * tile)) * tile


def _relax_in_bands(image: torch.Tensor, alpha: torch.Tensor, previous: torch.Tensor, size: tuple[int, int],
                    sweeps: int, emit) -> None:
    """One level of ``size`` relaxed in bands of rows, starting from the ``previous`` level's colours; each
    band's own rows go to ``emit(top, bottom, image, alpha, both)`` once the next band has read its input
    (so ``emit`` may write over ``image``). Each band has a halo of whole tiles: a tile's activity looks 1
    row past it and its sweeps ``sweeps`` rows, and every tile of a level reads the level's starting values
    only, so a band's own rows come out exactly as whole-level sweeps give them. The level's image and
    alpha rows are read from the full size as ``interpolate(mode="nearest")`` would."""
    height, width = size
    tile = _TILE if image.device.type == "cpu" else _TILE_ACCELERATOR
    halo = tile * -(-(sweeps + 1) // tile)
    rows = _band_rows(width, image.device)
    full = tuple(image.shape[-2:]) == size
    if not full:  # where the level's rows and columns come from in the full size
        image_rows, image_cols = (_nearest_index(n, m, image.device) for n, m in zip(image.shape[-2:], size))
    # Where interpolate(previous, size, "nearest") reads each row and column from.
    from_rows, from_cols = (_nearest_index(n, m, image.device) for n, m in zip(previous.shape[-2:], size))
    pending = None
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        start, stop = max(0, top - halo), min(height, bottom + halo)
        if full:
            band_image, band_alpha = image[..., start:stop, :], alpha[..., start:stop, :]
        else:
            band_image = image.index_select(2, image_rows[start:stop]).index_select(3, image_cols)
            band_alpha = alpha.index_select(2, image_rows[start:stop]).index_select(3, image_cols)
        band_image, band_alpha = _unit(band_image), band_alpha.to(_WORK_DTYPE).clamp(0, 1)
        if pending is not None:  # the previous band, now that this one has read the rows it shares with it
            emit(*pending)
        band_both = previous.index_select(2, from_rows[start:stop]).index_select(3, from_cols)
        _relax_level(band_image, band_alpha, band_both, sweeps)
        own = slice(top - start, bottom - start)
        pending = (top, bottom, band_image[..., own, :], band_alpha[..., own, :], band_both[..., own, :])
    emit(*pending)


def _level_sweeps(h: int, w: int, height: int, width: int) -> int:
    if max(h, w) <= _SMALL_SIDE:
        return _SMALL_SWEEPS
    return _TOP_SWEEPS if (h, w) == (height, width) else _SWEEPS


def _nearest_index(size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """The source index of each of ``out_size`` positions when interpolate(mode="nearest") resizes ``size``
    (asked of interpolate itself, so that bands of the result are exactly its own)."""
    index = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size, 1)  # exact below 2^24
    return F.interpolate(index, size=(out_size, 1), mode="nearest").view(-1).long()


def _level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """From 1x1 to the full size, each level about twice the previous one's side (Germer et al.)."""
    levels = max(1, math.ceil(math.log2(max(height, width))))
    return [(max(1, round(height ** (i / levels))), max(1, round(width ** (i / levels)))) for i in range(levels + 1)]


def _resize_nearest(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    if height * width >= 1 << 16:
        return F.interpolate(x, size=(height, width), mode="nearest")
    # Small outputs by indexing: interpolate() then copies the whole input (to channels-last) first.
    rows = torch.arange(height, device=x.device) * x.shape[-2] // height
    cols = torch.arange(width, device=x.device) * x.shape[-1] // width
    return x[:, :, rows[:, None], cols[None, :]]


def _relax_level(image: torch.Tensor, alpha: torch.Tensor, both: torch.Tensor, sweeps: int) -> None:
    """`sweeps` Jacobi sweeps over one level (F and B in ``both``, in place), only on the tiles where alpha
    is soft or changes.

    Elsewhere alpha is a constant 0 or 1: F (or B) is the pixel itself and the other colour only diffuses,
    so those tiles keep the coarser level's values. Runs of neighbouring tiles are relaxed together with a
    halo as wide as the number of sweeps, so their pixels get exactly the values whole-level sweeps would
    give them; outside the level the halo mirrors it, which stands for a replicated border. Tiles go row by
    row, each row's results written back once the next row has read its halo.
    """
    height, width = alpha.shape[-2:]
    tile = _TILE if alpha.device.type == "cpu" else _TILE_ACCELERATOR
    halo = sweeps
    if height <= tile and width <= tile:  # one tile: relaxed whatever alpha is
        active = torch.ones(alpha.shape[0], 1, 1, dtype=torch.bool)
    else:  # a tile needs relaxing where alpha is not constant over it and its 1-pixel border
        high = F.max_pool2d(alpha, tile + 2, tile, padding=1, ceil_mode=True)
        low = -F.max_pool2d(-alpha, tile + 2, tile, padding=1, ceil_mode=True)
        active = (high > low)[:, 0].cpu()  # [B, tile rows, tile columns]
    pending: list[tuple[tuple, torch.Tensor]] = []
    for row in range(active.shape[1]):
        runs = _runs(active[:, row])
        if not runs:
            continue
        top, bottom = row * tile, min(height, (row + 1) * tile)
        windows = []
        for n, first, last in runs:
            left, right = first * tile, min(width, last * tile)
            span = (n, top - halo, bottom + halo, left - halo, right + halo)
            windows.append(((slice(n, n + 1), slice(None), slice(top, bottom), slice(left, right)),
                            _window(image, *span), _window(alpha, *span), _window(both, *span)))
        for where, values in pending:  # the previous row of tiles, now that this row has read its halo
            both[where] = values
        pending = []
        for where, tile_image, tile_alpha, tile_both in windows:
            _start_from_known(tile_image, tile_alpha, tile_both)
            pending.append((where, _jacobi(tile_image, tile_alpha, tile_both, sweeps)))
    for where, values in pending:
        both[where] = values


def _runs(active: torch.Tensor) -> list[tuple[int, int, int]]:
    """(image, first tile, end tile) of each run of active tiles in one row of tiles [B, tiles_x],
    split so that no run is longer than _RUN_TILES."""
    runs = []
    for n, row in enumerate(active.tolist()):
        first = None
        for x, on in enumerate(row + [False]):
            if on and first is None:
                first = x
            elif first is not None and (not on or x - first == _RUN_TILES):
                runs.append((n, first, x))
                first = x if on else None
    return runs


def _window(x: torch.Tensor, n: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """A copy of x[n:n+1, :, top:bottom, left:right], mirrored about x's edges where it reaches past them."""
    height, width = x.shape[-2:]
    inside = x[n:n + 1, :, max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    return _mirror_pad(inside, max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))


def _start_from_known(image: torch.Tensor, alpha: torch.Tensor, both: torch.Tensor) -> None:
    """Where alpha is 1 (0) the foreground (background) is the pixel itself: start from the answer."""
    n = image.shape[1]
    both[:, :n] = torch.where(alpha == 1, image, both[:, :n])
    both[:, n:] = torch.where(alpha == 0, image, both[:, n:])


def _jacobi(image: torch.Tensor, alpha: torch.Tensor, both: torch.Tensor, sweeps: int) -> torch.Tensor:
    """`sweeps` Jacobi sweeps of the per-pixel 2x2 systems for F and B, on maps [N, C, h, w] that include a
    halo `sweeps` pixels wide: each sweep updates one pixel less on every side, the result is the core.

    Each pixel's F and B minimise (alpha F + (1 - alpha) B - I)^2 plus the smoothness terms
    w |F_p - F_q|^2 + w |B_p - B_q|^2 to its 4 neighbours q, w = reg + |alpha_p - alpha_q|.
    """
    height, width = alpha.shape[-2:]
    # Weights between each pixel and the one below / to its right.
    down = (alpha[..., 1:, :] - alpha[..., :-1, :]).abs_().mul_(_GRADIENT_WEIGHT).add_(_REGULARIZATION)
    right = (alpha[..., :, 1:] - alpha[..., :, :-1]).abs_().mul_(_GRADIENT_WEIGHT).add_(_REGULARIZATION)

    def weights(ring: int) -> tuple[torch.Tensor, ...]:  # up, down, left, right weights of the pixels ring..size-1-ring
        rows, cols = slice(ring, height - ring), slice(ring, width - ring)
        return (down[..., ring - 1:height - 1 - ring, cols], down[..., rows, cols],
                right[..., rows, ring - 1:width - 1 - ring], right[..., rows, cols])

    n = image.shape[1]  # colour channels: both holds n foreground then n background channels
    total = sum(weights(1))
    a = alpha[..., 1:-1, 1:-1]
    b = 1 - a
    a00 = a * a + total
    a11 = b * b + total
    a01 = a * b
    inverse = (a00 * a11 - a01 * a01).reciprocal_()
    # F = cf + qff * SF + qfb * SB and B = cb + qfb * SF + qbb * SB, with S the weighted neighbour sums.
    qff, qfb, qbb = a11.mul_(inverse), a01.neg_().mul_(inverse), a00.mul_(inverse)
    cf = (qff * a + qfb * b) * image[..., 1:-1, 1:-1]
    cb = (qfb * a + qbb * b) * image[..., 1:-1, 1:-1]
    for ring in range(1, sweeps + 1):
        up_w, down_w, left_w, right_w = weights(ring)
        # both covers the pixels ring - 1 .. size - ring; sums the pixels ring .. size - 1 - ring.
        sums = (up_w * both[..., :-2, 1:-1]).addcmul_(down_w, both[..., 2:, 1:-1])
        sums.addcmul_(left_w, both[..., 1:-1, :-2]).addcmul_(right_w, both[..., 1:-1, 2:])
        fore_sums, back_sums = sums[:, :n], sums[:, n:]
        inner = (..., slice(ring - 1, height - 1 - ring), slice(ring - 1, width - 1 - ring))  # in cf, qff...
        both = torch.empty_like(sums)
        torch.addcmul(cf[inner], qff[inner], fore_sums, out=both[:, :n]).addcmul_(qfb[inner], back_sums)
        torch.addcmul(cb[inner], qfb[inner], fore_sums, out=both[:, n:]).addcmul_(qbb[inner], back_sums)
        both.clamp_(0, 1)
    return both


def _mirror_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """x padded by mirroring about its edges (pixel -1 is pixel 0), by any amounts."""
    height, width = x.shape[-2:]
    rows = _mirror(torch.arange(-top, height + bottom, device=x.device), height)
    cols = _mirror(torch.arange(-left, width + right, device=x.device), width)
    out = x.new_empty(*x.shape[:-2], len(rows), len(cols))
    out[..., top:top + height, left:left + width] = x
    out[..., :top, left:left + width] = x[..., rows[:top], :]
    out[..., top + height:, left:left + width] = x[..., rows[top + height:], :]
    out[..., :, :left] = out[..., :, left + cols[:left]]
    out[..., :, left + width:] = out[..., :, left + cols[left + width:]]
    return out


def _mirror(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices beyond 0..size-1 mirrored about the ends (-1 -> 0, size -> size-1); repeatedly if needed."""
    index = index.remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


# refine_alpha: a colour guided filter (He et al. 2010) fitted at the mask's resolution and applied at the
# image's ("fast guided filter", He and Sun 2015): locally alpha = A . colour + b, with A and b smooth.
# Where colour explains the mask poorly (foreground and background alike) the fit is trusted in proportion
# to the share of the mask's variance it explains, and the bilinear mask fills in the rest.
# Radius and eps set on benchmarks/cutout.py: smaller eps follows colour more closely (1e-3 loses a third of
# the gain on similar colours); radius 4 suits 1024-pixel masks a little softer than the truth.
_GUIDE_RADIUS = 4  # in mask pixels
_GUIDE_EPS = 1e-4


def refines_edges(image_size: tuple[int, int], predicted_at: tuple[int, int]) -> bool:
    """Whether a mask predicted at ``predicted_at`` (height, width) has detail to gain on an image of
    ``image_size``: only when the image is larger on a side (else the mask is as sharp as the image)."""
    return image_size[0] > predicted_at[0] or image_size[1] > predicted_at[1]


def refine_alpha(image: torch.Tensor, alpha: torch.Tensor, predicted_at: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """``alpha`` ``[B, 1, h, w]`` (a mask predicted at another size) brought to the size of ``image``
    ``[B, 3, H, W]`` along the image's edges, ``[B, 1, H, W]``.

    A bilinearly enlarged mask smears a 1-pixel hair over several pixels. Here the mask is explained
    locally as a linear function of the image's colours, fitted at the mask's size (where both are known),
    and that function is applied to the full-size colours, which restores the edges the image shows.
    Where colours do not explain the mask, the bilinearly enlarged mask is kept. A mask that is not
    smaller than the image on either side is only resized (bilinearly): there is no detail to recover.

    ``predicted_at``: (height, width) the mask was predicted at, for a mask that has been enlarged since
    (a ComfyUI MASK at the image's size): it is first shrunk back to that size. Same device and dtype as
    ``image``.
    """
    _check_maps(image, alpha, "refine_alpha", same_size=False, allow_uint8=True)
    out_dtype = _WORK_DTYPE if image.dtype == torch.uint8 else image.dtype
    size = tuple(image.shape[-2:])
    alpha_w = alpha.to(_WORK_DTYPE).clamp(0, 1)
    if predicted_at is not None:
        if len(predicted_at) != 2 or min(predicted_at) < 1:
            raise DiffDISError(f"refine_alpha: predicted_at must be (height, width), got {predicted_at!r}")
        alpha_w = _resize(alpha_w, (int(predicted_at[0]), int(predicted_at[1])))
    small = tuple(alpha_w.shape[-2:])
    if not refines_edges(size, small):
        return _resize(alpha_w, size).to(out_dtype)
    if image.device.type == "cpu" and (image.dtype == torch.uint8 or size[0] * size[1] >= _BAND_PIXELS):
        return _refine_alpha_banded(image, alpha_w).to(out_dtype)
    image_w = image.to(_WORK_DTYPE)
    scale, offset, trust = _guided_coefficients(_resize(image_w, small), alpha_w, _GUIDE_RADIUS, _GUIDE_EPS)
    # trust * (A . I + b) + (1 - trust) * mask, with A and b already multiplied by trust
    refined = _resize(offset, size).add_(_resize(1 - trust, size).mul_(_resize(alpha_w, size)))
    for channel in range(3):  # one full-size channel of A at a time
        refined.addcmul_(_resize(scale[:, channel:channel + 1], size), image_w[:, channel:channel + 1])
    return refined.clamp_(0, 1).to(image.dtype)


def _refine_alpha_banded(image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """refine_alpha's fit and its full-size application, reading the full-size image (float or uint8) and
    writing the float32 result in bands (``image_io.resize_banded``: the 2-D resizes up to float rounding),
    so no full-size float map but the result exists."""
    size, small = tuple(image.shape[-2:]), tuple(alpha.shape[-2:])
    refined = torch.empty(image.shape[0], 1, *size, dtype=_WORK_DTYPE)
    for n in range(image.shape[0]):
        small_image = torch.empty(3, *small, dtype=_WORK_DTYPE)

        def shrunk(ys: slice, xs: slice, values: torch.Tensor) -> None:
            small_image[:, ys, xs] = values

        resize_banded(lambda ys, xs: _unit(image[n, :, ys, xs]), size, small, shrunk, channels=3)
        scale, offset, trust = _guided_coefficients(small_image[None], alpha[n:n + 1], _GUIDE_RADIUS, _GUIDE_EPS)
        # trust * (A . I + b) + (1 - trust) * mask, with A and b already multiplied by trust
        maps = torch.cat([offset, 1 - trust, alpha[n:n + 1], scale], 1)[0]

        def applied(ys: slice, xs: slice, values: torch.Tensor) -> None:
            band = values[0].addcmul_(values[1], values[2])
            for channel, colour in enumerate(_unit(image[n, :, ys, xs])):
                band.addcmul_(values[3 + channel], colour)
            refined[n, 0, ys, xs] = band.clamp_(0, 1)

        resize_banded(lambda ys, xs: maps[:, ys, xs], small, size, applied, channels=6)
    return refined


def _guided_coefficients(guide: torch.Tensor, target: torch.Tensor, radius: int, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The colour guided filter's trust-weighted A [B, 3, h, w] and b [B, 1, h, w], and the trust [B, 1, h, w]
    (the share of the target's variance the fit explains), each averaged over the windows."""
    pairs = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])  # rr rg rb gg gb bb
    products = [guide, target, guide * target, guide[:, pairs[0]] * guide[:, pairs[1]], target * target]
    means = _box_mean(torch.cat(products, 1), radius)
    mean_i, mean_p = means[:, :3], means[:, 3:4]
    cov = means[:, 4:7] - mean_i * mean_p
    var = means[:, 7:13] - mean_i[:, pairs[0]] * mean_i[:, pairs[1]]
    var_p = means[:, 13:14] - mean_p * mean_p
    var[:, [0, 3, 5]] += eps
    rr, rg, rb, gg, gb, bb = var.unbind(1)
    # (var + eps I)^-1 cov by cofactors (the matrix is symmetric).
    c00, c01, c02 = gg * bb - gb * gb, rb * gb - rg * bb, rg * gb - rb * gg
    c11, c12, c22 = rr * bb - rb * rb, rb * rg - rr * gb, rr * gg - rg * rg
    det = rr * c00 + rg * c01 + rb * c02
    r, g, b = cov.unbind(1)
    scale = torch.stack([c00 * r + c01 * g + c02 * b, c01 * r + c11 * g + c12 * b,
                         c02 * r + c12 * g + c22 * b], 1) / det[:, None]
    offset = mean_p - (scale * mean_i).sum(1, keepdim=True)
    trust = ((scale * cov).sum(1, keepdim=True) / var_p.clamp_min(1e-6)).clamp_(0, 1)
    averaged = _box_mean(torch.cat([scale * trust, offset * trust, trust], 1), radius)
    return averaged[:, :3], averaged[:, 3:4], averaged[:, 4:]


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The mean of ``x`` ``[B, C, H, W]`` over each pixel's (2 radius + 1)^2 window, clipped at the borders.

    Sums of shifted slices: exact in float32 and, for the small radius used, faster than avg_pool2d or
    cumulative sums on a CPU.
    """
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius))
    rows = padded[..., :height, :].clone()
    for shift in range(1, 2 * radius + 1):
        rows += padded[..., shift:shift + height, :]
    sums = rows[..., :width].clone()
    for shift in range(1, 2 * radius + 1):
        sums += rows[..., shift:shift + width]

    def counts(size: int) -> torch.Tensor:
        index = torch.arange(size, device=x.device)
        return ((index + radius).clamp(max=size - 1) - (index - radius).clamp(min=0) + 1).to(x.dtype)

    return sums.div_(counts(height)[:, None] * counts(width))
