"""Reading images for the model and writing masks and cutouts, in memory bounded by the image size.

A 100-megapixel photo is held once as 8-bit RGBA (4 bytes a pixel, the cutout being built in place);
the pipeline resizes its 8-bit RGB view for the model, and the mask comes back to full size in bands,
straight into 8 bits, so no full-size float copy is ever made. The mask's resizing is the pipeline's
own (bilinear, antialiased when shrinking) done one axis at a time, which gives the same numbers.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import DiffDISError
from .files import atomic_write

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm"}
# The default pixel budget follows from memory: the command line's default path (both refinements) peaks
# at about 20 bytes a pixel besides the process and model (docs/cli.md: a 108-megapixel photo); with a
# margin, this many. By default it admits the images that the memory available once the model is loaded holds.
DEFAULT_PATH_BYTES_PER_PIXEL = 24
# The budget where the available memory cannot be read: 108-megapixel phone photos (12000 x 9000) pass.
DEFAULT_MAX_MEGAPIXELS = 128
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
# Floats per band when resizing in bands (16 MB of float32).
BAND_ELEMENTS = 1 << 22
# The PNG text chunk that marks a result as written by DiffDIS (and with what settings).
RESULT_KEY = "diffdis"


@dataclass
class LoadedImage:
    """An input image at its displayed size (EXIF orientation applied).

    ``rgba``: [H, W, 4] uint8, the colours as the cutout stores them; channel 3 holds the image's own
    alpha (255 where it has none) until the cutout's alpha replaces it. ``deep``: the grayscale
    values of 16-bit or float images (white = ``deep_peak``), so the model sees their full precision.
    """

    rgba: np.ndarray
    has_alpha: bool
    deep: np.ndarray | None = None
    deep_peak: float = 255.0
    nan_pixels: int = 0  # float images: pixels that are NaN (0 in ``rgba``)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.rgba.shape[0]), int(self.rgba.shape[1])

    def rgb(self) -> torch.Tensor:
        """The pixels as RGB [3, H, W]: a uint8 view of ``rgba`` (no copy), or float in [0, 1] for
        16-bit and float images."""
        if self.deep is not None:
            return torch.from_numpy(_deep_to_unit(self.deep, self.deep_peak))[None].expand(3, -1, -1)
        return torch.from_numpy(self.rgba).permute(2, 0, 1)[:3]


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping (Linux's MemAvailable, else the free pages), or None
    where neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_max_pixels(available: int | None) -> int:
    """The default pixel budget: the whole megapixels that ``available`` bytes hold at the default path's
    DEFAULT_PATH_BYTES_PER_PIXEL (at least one), or DEFAULT_MAX_MEGAPIXELS where it is unknown (None)."""
    if available is None:
        return DEFAULT_MAX_MEGAPIXELS * 1_000_000
    return max(1, available // DEFAULT_PATH_BYTES_PER_PIXEL // 1_000_000) * 1_000_000


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> LoadedImage:
    """Read an image file for the model: any PIL mode (grayscale, alpha, palette, CMYK, 16-bit, float).

    ``max_pixels``: refuse larger images from their header, before decoding them. Every problem is a
    DiffDISError naming the file and the reason.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise DiffDISError(
                        f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, above the budget of "
                        f"{max_pixels / 1e6:g}; pass --max-megapixels {-(-width * height // 1_000_000)} (or 0 for no "
                        "limit) if this machine has the memory")
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                loaded = _loaded(image)
    except FileNotFoundError:
        raise DiffDISError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DiffDISError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise DiffDISError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as error:
        raise DiffDISError(f"{path}: {error}") from None
    except MemoryError:
        raise DiffDISError(f"{path}: not enough memory to decode it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DiffDISError(f"{path}: unreadable image ({error})") from None
    if loaded.nan_pixels:  # NaN would run through the model and look like damaged weights
        raise DiffDISError(f"{path}: {loaded.nan_pixels} of its pixels are NaN (not a number), so there is "
                           "nothing to segment there; fill them in (or save the image without them) and run it again")
    return loaded


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as RGB [3, H, W]: uint8 for 8-bit images (no float copy of a large
    photo), float in [0, 1] for 16-bit and float images."""
    return _loaded(image).rgb()


def _loaded(image: Image.Image) -> LoadedImage:
    width, height = image.size
    rgba = np.empty((height, width, 4), np.uint8)
    deep = np.asarray(image) if image.mode in HIGH_BIT_DEPTH_MODES else None
    peak = _deep_peak(image) if deep is not None else 255.0
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    nan_pixels = 0
    step = max(1, BAND_ELEMENTS // max(1, width))
    for top in range(0, height, step):
        if deep is not None:
            # Through float: PIL's own conversion clips 16-bit values to 8 bits.
            unit = _deep_to_unit(deep[top:top + step], peak)
            nan = np.isnan(unit)
            if nan.any():
                nan_pixels += int(nan.sum())
                unit[nan] = 0
            gray = np.round(unit * 255).astype(np.uint8)
            rgba[top:top + step, :, :3] = gray[..., None]
            rgba[top:top + step, :, 3] = 255
        else:
            # Through RGBA, so palette transparency is honoured; CMYK, YCbCr, LA, ... all convert.
            band = image.crop((0, top, width, min(height, top + step)))
            rgba[top:top + step] = np.asarray(band if band.mode == "RGBA" else _to_rgba(band))
    return LoadedImage(rgba, has_alpha, deep, peak, nan_pixels)


def _to_rgba(band: Image.Image) -> Image.Image:
    try:
        return band.convert("RGBA")
    except ValueError:
        return band.convert("RGB").convert("RGBA")


def _deep_peak(image: Image.Image) -> float:
    """The white level of a 16-bit or float grayscale image (32-bit "I" images holding 8-bit values: 255)."""
    if image.mode == "F":
        return 1.0
    if image.mode.startswith("I;16") or image.getextrema()[1] > 255:
        return 65535.0
    return 255.0


def _deep_to_unit(array: np.ndarray, peak: float) -> np.ndarray:
    """16-bit or float grayscale pixels -> float32 in [0, 1]."""
    return np.clip(array.astype(np.float32) / np.float32(peak), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- resizing
def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one resize rule for images and maps ``[B, C, h, w]``: bilinear, antialiased when either side
    shrinks (like PIL), a no-op at the same size. uint8 stays uint8 on the CPU (PyTorch's kernel resizes
    8-bit images without a float copy); elsewhere it becomes float in [0, 1]."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if x.dtype == torch.uint8 and x.device.type != "cpu":
        x = x.float() / 255
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_banded(
    source: Callable[[slice, slice], torch.Tensor],
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    sink: Callable[[slice, slice, torch.Tensor], None],
    channels: int = 1,
) -> None:
    """``resize`` one axis at a time, reading ``source(rows, cols)`` and writing ``sink(rows, cols, values)``
    in bands.

    Width then height gives torch's 2-D result up to float rounding (~1e-7; an axis that grows is
    bilinear with or without antialiasing); for tall images the height goes first (a smaller
    intermediate).
    """
    (h, w), (out_h, out_w) = in_size, out_size

    def interp(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if x.shape[-1] == 1 == size[1]:
            # torch's antialiased kernel gets a band 1 pixel wide wrong (torch 2.13): resize it as 2 wide.
            return interp(x.expand(*x.shape[:-1], 2), (size[0], 2))[..., :1]
        return resize(x[None].float(), size)[0]

    if h * out_w <= out_h * w * 2:  # width first: intermediate [C, h, out_w]
        middle = torch.empty(channels, h, out_w)
        step = max(1, BAND_ELEMENTS // (channels * max(w, out_w)))
        for top in range(0, h, step):
            rows = slice(top, min(h, top + step))
            middle[:, rows] = interp(source(rows, slice(0, w)), (rows.stop - rows.start, out_w))
        step = max(1, BAND_ELEMENTS // (channels * max(h, out_h)))
        for left in range(0, out_w, step):
            cols = slice(left, min(out_w, left + step))
            sink(slice(0, out_h), cols, interp(middle[:, :, cols], (out_h, cols.stop - cols.start)))
    else:  # height first: intermediate [C, out_h, w]
        middle = torch.empty(channels, out_h, w)
        step = max(1, BAND_ELEMENTS // (channels * max(h, out_h)))
        for left in range(0, w, step):
            cols = slice(left, min(w, left + step))
            middle[:, :, cols] = interp(source(slice(0, h), cols), (out_h, cols.stop - cols.start))
        step = max(1, BAND_ELEMENTS // (channels * max(w, out_w)))
        for top in range(0, out_h, step):
            rows = slice(top, min(out_h, top + step))
            sink(rows, slice(0, out_w), interp(middle[:, rows], (rows.stop - rows.start, out_w)))


def map_to_uint8(map_: torch.Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """A float map in [0, 1] ([h, w], [1, h, w] or [1, 1, h, w]) -> uint8 [H, W], resized to ``size``
    (height, width) in bands when given."""
    map_ = map_.detach().float().cpu()
    map_ = map_.reshape(1, *map_.shape[-2:])
    size = tuple(size) if size is not None else tuple(map_.shape[-2:])
    out = np.empty(size, np.uint8)

    def put(ys: slice, xs: slice, values: torch.Tensor) -> None:
        out[ys, xs] = (values[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    resize_banded(lambda ys, xs: map_[:, ys, xs], tuple(map_.shape[-2:]), size, put)
    return out


def multiply_alpha(mask: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """mask x alpha for uint8 maps, rounded (in place into ``mask``, in bands)."""
    step = max(1, BAND_ELEMENTS // max(1, mask.shape[1]))
    for top in range(0, mask.shape[0], step):
        rows = slice(top, top + step)
        product = mask[rows].astype(np.uint32) * alpha[rows] + 127
        mask[rows] = (product // 255).astype(np.uint8)
    return mask


# ---------------------------------------------------------------------------------------------- writing
def save_image(image: Image.Image, path: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Write a PNG atomically (``files.atomic_write``: never a truncated or interleaved file); ``info`` is
    stored in the file as a JSON text chunk (``RESULT_KEY``)."""
    pnginfo = None
    if info is not None:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text(RESULT_KEY, json.dumps(info, sort_keys=True))
    with atomic_write(path) as stream:
        image.save(stream, format="PNG", pnginfo=pnginfo)


def is_whole_png(path: str | os.PathLike) -> bool:
    """Whether a PNG reads back whole: every chunk present with its checksum right, up to the end chunk
    (PIL's verify: the whole file is read, nothing is decompressed). A truncated file fails."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError, EOFError):
        return False


def result_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """What ``save_image`` stored in a result (from the PNG header only), or None when ``path`` is not
    a PNG written that way."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or RESULT_KEY not in image.info:
                return None
            info = json.loads(image.info[RESULT_KEY])
            info["size"] = list(image.size)
            return info
    except (OSError, ValueError, SyntaxError, EOFError):
        return None
