"""DiffDIS Apply Alpha: turn an image and its mask into a cutout (RGBA) or a composite on a colour."""

from __future__ import annotations

from . import tensors
from .checks import check_float, check_int
from .services import CATEGORY, SEARCH_ALIASES

BACKGROUNDS = tensors.BACKGROUNDS


class DiffDISApplyAlpha:
    SEARCH_ALIASES = [*SEARCH_ALIASES, "apply mask", "transparent background", "replace background", "composite",
                      "join image with alpha"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to cut out (an alpha channel it has is replaced)."}),
                "mask": ("MASK", {
                    "tooltip": "Foreground = 1, as DiffDIS Decode gives it. Note: core Join Image with Alpha expects "
                               "the inverse (it computes alpha = 1 - mask); this node takes the mask as is. A mask of "
                               "another size is resized to the image; one mask is reused for every image."}),
                "background": (BACKGROUNDS, {"default": "alpha", "tooltip": tensors.BACKGROUND_TOOLTIP}),
                "custom_color": ("STRING", {"default": "#3366CC", "tooltip": tensors.CUSTOM_COLOR_TOOLTIP}),
                "mask_blur": ("INT", {
                    "default": 0, "min": 0, "max": 256, "step": 1,
                    "tooltip": "Feather the mask edge with a Gaussian of this radius in pixels (0 = off)."}),
                "mask_expand": ("INT", {
                    "default": 0, "min": -256, "max": 256, "step": 1,
                    "tooltip": "Grow (+) or shrink (-) the kept region by this many pixels before feathering."}),
                "threshold": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "0 keeps the soft mask (fine hair and semi-transparency); above 0 the mask becomes "
                               "hard: 1 where it is at least this value, else 0."}),
                "invert": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep the background and remove the foreground instead."}),
            }
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("RGBA cutout for 'alpha', otherwise the image composited on the chosen colour.",
                       "The refined mask that was applied (1 = kept).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Cuts the foreground out: the mask (after optional threshold, invert, grow/shrink and feather) "
                   "becomes the image's alpha channel, or the background is replaced by a solid colour.")

    def apply(self, image, mask, background: str, custom_color: str, mask_blur: int, mask_expand: int,
              threshold: float, invert: bool):
        color = tensors.background_color(background, custom_color)
        mask_blur = check_int("mask_blur", mask_blur, 0, 256)
        mask_expand = check_int("mask_expand", mask_expand, -256, 256)
        threshold = check_float("threshold", threshold, 0.0, 1.0)
        rgb = tensors.image_to_rgb(image)
        mask = tensors.to_mask(mask).to(rgb.device)
        rgb, mask = tensors.match_batch(rgb, mask)
        mask = tensors.resize_mask(mask, tuple(rgb.shape[1:3]))
        mask = tensors.refine_mask(mask, threshold, bool(invert), mask_expand, mask_blur)
        return tensors.apply_background(rgb, mask, color), mask
