"""Reading any valid image as RGB in [0, 1], and writing masks and cutouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DiffDISError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".ppm", ".pgm"}


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as float RGB [3, H, W] in [0, 1], at its displayed size (EXIF orientation applied).

    Handles grayscale, alpha, palette, CMYK and 16-bit/float images; raises DiffDISError with the
    reason for anything unreadable.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = pil_to_rgb_tensor(image)
            return rgb.float() / 255 if rgb.dtype == torch.uint8 else rgb
    except FileNotFoundError:
        raise DiffDISError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DiffDISError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise DiffDISError(f"{path}: not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DiffDISError(f"{path}: unreadable image ({error})") from None


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode as RGB [3, H, W]: uint8 for 8-bit images (no float copy of a large
    photo), float in [0, 1] for 16-bit and float images."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float grayscale: convert("RGB") would clip to 8 bits.
        array = np.asarray(image, dtype=np.float32)
        peak = 1.0 if image.mode == "F" else 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(gray))[None].expand(3, -1, -1).clone()
    if image.mode not in ("RGB", "L"):
        # Palette/LA/RGBA/CMYK/YCbCr...: through RGBA so palette transparency is honoured, then drop alpha.
        image = image.convert("RGBA") if image.mode in ("P", "PA", "LA", "RGBa", "La") else image
        image = image.convert("RGB")
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def to_uint8(map_: torch.Tensor) -> np.ndarray:
    """A [H, W] (or [1, H, W], [1, 1, H, W]) float map in [0, 1] -> uint8 array."""
    map_ = map_.detach().float().cpu()
    return (map_.reshape(map_.shape[-2:]).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def cutout(rgb: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """RGBA image: the RGB pixels with the mask (foreground = 1) as alpha."""
    pixels = (rgb.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.dstack([pixels, to_uint8(mask)]), "RGBA")


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Write atomically, so an interrupted run never leaves a truncated file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
