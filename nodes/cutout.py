"""The one-node cutout (DiffDIS Remove Background) and DiffDIS as ComfyUI's BACKGROUND_REMOVAL model.

Both run the three stages per chunk of frames (encode, one UNet step, decode the mask only), so no
condition or latents are kept between stages, under ComfyUI's memory management, with progress and
Cancel as the stage nodes.
"""

from __future__ import annotations

import torch

from diffdis_core import spec

from . import batching, services, tensors
from .checks import check_int
from .segmentation import (MAX_RESOLUTION, MAX_SEED, check_model, check_processing_res, decode_chunk,
                           encode_chunk, segment_chunk)
from .services import CATEGORY, SEARCH_ALIASES

DEFAULT_PROCESSING_RES = 1024  # as trained


def cutout_masks(model, image: torch.Tensor, processing_res: int, seed: int = 0, tta: bool = False,
                 ensemble: int = 1, normalize: bool = True) -> torch.Tensor:
    """DiffDIS masks (foreground = 1) of an IMAGE batch: MASK [B, H, W] on ComfyUI's intermediate
    device; the same values as Encode Condition -> One-Step Segment -> Decode (mask only)."""
    tensors.image_to_rgb(image)  # checks the IMAGE before any work
    frames = image if image.ndim == 4 else image[None]
    count = frames.shape[0]
    views = len(spec.TTA_VIEWS) if tta else 1
    per_image = max(batching.encode_bytes(processing_res, model.vae_dtype),
                    batching.segment_bytes(processing_res, model.dtype, model.vae_dtype, tta),
                    batching.decode_bytes(processing_res, model.vae_dtype, ensemble, tta))
    pipe = model.ready(per_image)
    progress = services.progress_bar(count * (2 + views * ensemble))  # encode, each UNet call, decode
    keep_on = services.intermediate_device()

    def cutout_part(start: int, stop: int) -> torch.Tensor:
        condition = encode_chunk(pipe, frames[start:stop], processing_res, keep_image=tta)
        progress.update(stop - start)
        latents = segment_chunk(pipe, condition, seed, ensemble, tta, progress.update)
        del condition
        mask, _ = decode_chunk(pipe, latents, decode_edge=False, normalize=normalize)
        progress.update(stop - start)
        return mask.to(keep_on)

    with services.cancellable(pipe.unet, pipe.vae):
        parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), cutout_part)
    return tensors.concat_masks(parts)


class DiffDISRemoveBackground:
    SEARCH_ALIASES = [*SEARCH_ALIASES, "cut out", "transparent background", "replace background", "one node"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DIFFDIS_MODEL", {"tooltip": "From Load DiffDIS."}),
                "image": ("IMAGE", {"tooltip": "The image(s) to cut out; a batch (e.g. video frames) runs in chunks "
                                               "that fit in memory. An alpha channel is ignored."}),
                "processing_res": ("INT", {
                    "default": DEFAULT_PROCESSING_RES, "min": spec.PROCESSING_MULTIPLE, "max": MAX_RESOLUTION,
                    "step": spec.PROCESSING_MULTIPLE,
                    "tooltip": "Side of the square the image is resized to for the model: a multiple of 64 (of 256 "
                               "with TTA). DiffDIS was trained at 1024; lower is faster and coarser."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise; the same seed gives the same mask."}),
                "tta": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "The authors' test-time augmentation (flip x 3 scales, averaged): a little finer, about "
                               "six times slower. Needs a processing_res that is a multiple of 256."}),
                "background": (tensors.BACKGROUNDS, {"default": "alpha", "tooltip": tensors.BACKGROUND_TOOLTIP}),
                "custom_color": ("STRING", {"default": "#3366CC", "tooltip": tensors.CUSTOM_COLOR_TOOLTIP}),
            }
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("RGBA cutout for 'alpha', otherwise the image on the chosen colour.",
                       "The foreground mask at the image size (1 = foreground).")
    FUNCTION = "remove_background"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Cuts the foreground out of an image in one node: DiffDIS segments it (mask only, at "
                   "processing_res) and the mask becomes the image's alpha channel, or the background is replaced "
                   "by a colour. The same mask as the Encode / Segment / Decode nodes with the same settings; use "
                   "those (and DiffDIS Apply Alpha) for ensembles, the edge map or mask refinements.")

    def remove_background(self, model, image, processing_res: int, seed: int, tta: bool, background: str,
                          custom_color: str):
        model = check_model(model)
        tta = bool(tta)
        processing_res = check_processing_res(processing_res, tta=tta)
        seed = check_int("seed", seed, 0, MAX_SEED)
        color = tensors.background_color(background, custom_color)
        mask = cutout_masks(model, image, processing_res, seed=seed, tta=tta)
        rgb = tensors.image_to_rgb(image).to(mask.device)
        # The cutout-quality refinements (issue 9: diffdis_core.matting's foreground decontamination and
        # full-resolution edge refinement) take (rgb, mask) here and return what is composited.
        return tensors.apply_background(rgb, mask, color), mask


class DiffDISBackgroundRemoval:
    """DiffDIS as ComfyUI's ``BACKGROUND_REMOVAL`` model (comfy/bg_removal_model.py, ComfyUI >= 0.21):
    what core *Remove Background* takes. ``encode_image(IMAGE)`` gives the foreground mask as that
    node's own models do: float [B, 1, H, W] in 0..1 at the image size, on ComfyUI's intermediate
    device and dtype. Settings are the trained ones: processing size 1024, seed 0, no TTA.
    """

    seed = 0

    def __init__(self, model, processing_res: int = DEFAULT_PROCESSING_RES):
        self.diffdis = check_model(model)
        self.image_size = processing_res  # the name ComfyUI's own models use
        # What ComfyUI's own background-removal models expose, for nodes that look at them.
        self.model = self.diffdis.modules
        self.patcher = self.diffdis.patcher
        self.load_device = self.diffdis.load_device
        self.dtype = self.diffdis.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        mask = cutout_masks(self.diffdis, image, self.image_size, seed=self.seed)
        return mask[:, None].to(services.intermediate_dtype())

    def __repr__(self) -> str:
        return f"DiffDISBackgroundRemoval({self.diffdis!r}, processing_res={self.image_size})"
