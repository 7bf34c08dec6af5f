"""DiffDIS Apply Alpha: turn an image and its mask into a cutout (RGBA) or a composite on a colour."""

from __future__ import annotations

from diffdis_core import spec

from . import refinement, services, tensors
from .checks import check_float, check_int
from .services import CATEGORY, SEARCH_ALIASES

BACKGROUNDS = tensors.BACKGROUNDS


class DiffDISApplyAlpha:
    SEARCH_ALIASES = [*SEARCH_ALIASES, "apply mask", "transparent background", "replace background", "composite",
                      "join image with alpha", *refinement.SEARCH_ALIASES]

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
            },
            # Optional, so graphs and API prompts saved before they existed still validate.
            "optional": {
                "refine_foreground": ("BOOLEAN", {"default": True, "tooltip": refinement.REFINE_FOREGROUND_TOOLTIP}),
                "refine_edges": ("BOOLEAN", {"default": True, "tooltip": refinement.REFINE_EDGES_TOOLTIP}),
                "processing_res": services.processing_res_input(
                    "The size the mask was predicted at: set it to DiffDIS Encode Condition's "
                    "processing_res (a MASK does not carry it). Used by refine_edges only."),
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("RGBA cutout (straight alpha) for 'alpha', otherwise the image composited on the chosen colour.",
                       "The refined mask that was applied (1 = kept).")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Cuts the foreground out: the mask (edges refined to the full image size, then optional threshold, "
                   "invert, grow/shrink and feather) becomes the image's alpha channel, or the background is replaced "
                   "by a solid colour; under soft edges the subject's own colours are estimated so no fringe of the "
                   "old background remains.")

    def apply(self, image, mask, background: str, custom_color: str, mask_blur: int, mask_expand: int,
              threshold: float, invert: bool, refine_foreground: bool = True, refine_edges: bool = True,
              processing_res: int = services.DEFAULT_PROCESSING_RES):
        color = tensors.background_color(background, custom_color)
        mask_blur = check_int("mask_blur", mask_blur, 0, 256)
        mask_expand = check_int("mask_expand", mask_expand, -256, 256)
        threshold = check_float("threshold", threshold, 0.0, 1.0)
        processing_res = spec.check_processing_res(processing_res)
        rgb = tensors.image_to_rgb(image)
        mask = tensors.to_mask(mask).to(rgb.device)
        rgb, mask = tensors.match_batch(rgb, mask)
        colours, alpha = refinement.refine_cutouts(
            rgb, mask, processing_res, bool(refine_edges), bool(refine_foreground),
            device=services.choose_devices("auto")[0],
            adjust=lambda m: tensors.refine_mask(m, threshold, bool(invert), mask_expand, mask_blur),
            progress=services.progress_bar(rgb.shape[0]))
        return tensors.apply_background(colours, alpha, color), alpha
