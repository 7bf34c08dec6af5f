"""ComfyUI's tensor conventions: IMAGE is float [B, H, W, C] in 0..1 (C = 3, or 4 when an RGBA image
reaches a node), MASK is float [B, H, W] (a single [H, W] mask is accepted too). DiffDIS masks are
foreground = 1."""

from __future__ import annotations

import re

import torch

from diffdis_core.cutout import adjust_alpha

from .checks import error


def image_to_rgb(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """An IMAGE as float [B, H, W, 3] (an alpha channel is dropped, a single image gets a batch axis)."""
    if not isinstance(image, torch.Tensor):
        raise error(f"{name} must be an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise error(f"{name} must be an IMAGE [batch, height, width, 3 or 4 channels], "
                    f"got shape {list(image.shape)}")
    image = image.float()
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE as the core's float [B, 3, H, W] in [0, 1]."""
    return image_to_rgb(image).movedim(-1, 1)


def to_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A MASK as float [B, H, W]; [H, W], [B, 1, H, W] and [B, H, W, 1] are accepted."""
    if not isinstance(mask, torch.Tensor):
        raise error(f"{name} must be a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3 or 0 in mask.shape:
        raise error(f"{name} must be a MASK [batch, height, width] or [height, width], "
                    f"got shape {list(mask.shape)}")
    return mask.float()


def concat_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """MASK batches of one size as one MASK batch."""
    if len({tuple(m.shape[-2:]) for m in masks}) > 1:
        raise error("the images of one batch have different sizes; a MASK batch needs one size: "
                    "run them through separate DiffDIS Encode Condition nodes")
    return torch.cat(masks)


def maps_to_mask(maps: torch.Tensor) -> torch.Tensor:
    """The core's [B, 1, H, W] maps as a MASK [B, H, W]."""
    return maps[:, 0].float()


def match_batch(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat a single image or mask to the other's batch size; other mismatches are errors."""
    if image.shape[0] == mask.shape[0]:
        return image, mask
    if mask.shape[0] == 1:
        return image, mask.expand(image.shape[0], -1, -1)
    if image.shape[0] == 1:
        return image.expand(mask.shape[0], -1, -1, -1), mask
    raise error(f"image batch ({image.shape[0]}) and mask batch ({mask.shape[0]}) differ: give as many masks as "
                "images, or a single one")


def refine_mask(mask: torch.Tensor, threshold: float, invert: bool, expand: int, blur: int) -> torch.Tensor:
    """A MASK [B, H, W] thresholded, inverted, grown (``expand`` > 0) or shrunk and feathered (``blur``):
    the cutout's ``adjust_alpha``."""
    return adjust_alpha(mask[:, None], threshold, invert, expand, blur)[:, 0]


# ---------------------------------------------------------------------------- backgrounds
NAMED_BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5),
                     "green": (0.0, 1.0, 0.0)}
BACKGROUNDS = ["alpha", *NAMED_BACKGROUNDS, "custom"]
BACKGROUND_TOOLTIP = ("alpha: an RGBA image with the mask as transparency (Save Image writes an RGBA PNG). "
                      "white / black / gray / green (#00FF00) / custom: an RGB image with the background replaced "
                      "by that colour.")
CUSTOM_COLOR_TOOLTIP = "The background colour for 'custom': #RRGGBB, #RGB or R, G, B (0-255)."


def background_color(background: str, custom_color: str) -> tuple[float, float, float] | None:
    """The RGB fill for a ``background`` choice (None for alpha); checks both values."""
    if background not in BACKGROUNDS:
        raise error(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    if background == "alpha":
        return None
    return parse_color(custom_color) if background == "custom" else NAMED_BACKGROUNDS[background]


def apply_background(rgb: torch.Tensor, alpha: torch.Tensor, color: tuple[float, float, float] | None) -> torch.Tensor:
    """RGB [B, H, W, 3] and alpha [B, H, W] -> RGBA (``color`` None) or RGB on ``color``."""
    alpha = alpha[..., None].to(rgb.dtype)
    if color is None:
        return torch.cat([rgb, alpha], dim=-1)
    fill = torch.tensor(color, dtype=rgb.dtype, device=rgb.device)
    return rgb * alpha + fill * (1 - alpha)


def parse_color(text: str) -> tuple[float, float, float]:
    """'#RRGGBB', '#RGB' (the '#' optional) or 'R, G, B' with 0..255 values -> RGB in 0..1."""
    value = str(text).strip()
    hex_digits = value.lstrip("#")
    if re.fullmatch(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}", hex_digits):
        if len(hex_digits) == 3:
            hex_digits = "".join(c * 2 for c in hex_digits)
        return tuple(int(hex_digits[i:i + 2], 16) / 255 for i in (0, 2, 4))
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 3 and all(p.isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) / 255 for p in parts)
    raise error(f"custom_color {text!r} is not a colour: write it as #RRGGBB (e.g. #3366CC) or R, G, B (0-255)")
