"""The three stages of DiffDIS as nodes: encode the image, one UNet step, decode mask and edge.

Each node is a thin loop over the core pipeline's stage of the same name: it asks ComfyUI to load
the model, splits the batch into chunks that fit in memory, reports progress, honours cancel, and
keeps its result on ComfyUI's intermediate device (the CPU) so no VRAM is held between nodes.
"""

from __future__ import annotations

import torch

from . import batching, services, tensors
from .checks import check_int, error
from .models import DiffDISModel
from .services import CATEGORY

MAX_RESOLUTION = 4096
TTA_VIEW_COUNT = 6  # the authors' flip x 3 scales (diffdis_core.pipeline.TTA_VIEWS)


def _check_model(model) -> DiffDISModel:
    if not isinstance(model, DiffDISModel):
        raise error(f"model must come from a Load DiffDIS node, got {type(model).__name__}")
    return model


class DiffDISEncodeCondition:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DIFFDIS_MODEL", {"tooltip": "From Load DiffDIS."}),
                "image": ("IMAGE", {"tooltip": "The image(s) to segment; a batch (e.g. video frames) is processed "
                                               "in chunks that fit in memory. An alpha channel is ignored."}),
                "processing_res": ("INT", {
                    "default": 1024, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                    "tooltip": "Side of the square the image is resized to for the model (a multiple of 8). "
                               "DiffDIS was trained at 1024; the mask is resized back to the image size."}),
            }
        }

    RETURN_TYPES = ("DIFFDIS_COND",)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("The image's VAE latents at full, 1/2, 1/4 and 1/8 size, and each image's original size.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes the image into what DiffDIS is conditioned on: the VAE latents of the image resized to "
                   "processing_res, at four scales. Feed it to DiffDIS One-Step Segment.")

    def encode(self, model, image, processing_res: int):
        model = _check_model(model)
        processing_res = check_int("processing_res", processing_res, 64, MAX_RESOLUTION, multiple=8)
        pixels = tensors.image_to_pixels(image)
        count = pixels.shape[0]
        per_image = batching.encode_bytes(processing_res, model.vae_dtype)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count)
        keep_on = services.intermediate_device()

        def encode_chunk(start: int, stop: int):
            cond = pipe.encode_condition(pixels[start:stop].to(pipe.device), processing_res).to(keep_on)
            progress.update(stop - start)
            return cond

        parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), encode_chunk)
        return (batching.concat_conditions(parts),)


class DiffDISOneStepSegment:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DIFFDIS_MODEL", {"tooltip": "From Load DiffDIS."}),
                "cond": ("DIFFDIS_COND", {"tooltip": "From DiffDIS Encode Condition."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                    "tooltip": "Seed of the starting noise. The same seed gives the same mask; every image of a batch "
                               "starts from the same noise, so a frame's mask does not depend on its batch."}),
                "ensemble": ("INT", {
                    "default": 1, "min": 1, "max": 16,
                    "tooltip": "Average this many noise draws (each costs one more UNet step and decode)."}),
                "tta": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "The authors' test-time augmentation: horizontal flip x scales 0.75, 1 and 1.25, "
                               "averaged (six times slower; the setting of the paper's evaluation)."}),
            }
        }

    RETURN_TYPES = ("DIFFDIS_LATENTS",)
    RETURN_NAMES = ("latents",)
    OUTPUT_TOOLTIPS = ("The predicted mask and edge latents (per augmented view and noise draw).",)
    FUNCTION = "segment"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs DiffDIS's single denoising step: from noise at t = 999 the UNet predicts the mask and edge "
                   "latents together, conditioned on the image. Decode them with DiffDIS Decode Mask/Edge.")

    def segment(self, model, cond, seed: int, ensemble: int, tta: bool):
        model = _check_model(model)
        if not all(hasattr(cond, a) for a in ("image", "rgb_latents", "sizes")):
            raise error(f"cond must come from a DiffDIS Encode Condition node, got {type(cond).__name__}")
        seed = check_int("seed", seed, 0, 0xFFFFFFFFFFFFFFFF)
        ensemble = check_int("ensemble", ensemble, 1, 16)
        tta = bool(tta)
        count = len(cond.sizes)
        processing_res = int(cond.image.shape[-1])
        per_image = batching.segment_bytes(processing_res, model.dtype, model.vae_dtype, tta)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count * ensemble * (TTA_VIEW_COUNT if tta else 1))
        keep_on = services.intermediate_device()

        def segment_chunk(start: int, stop: int):
            part = batching.slice_condition(cond, start, stop, pipe.device, pipe.vae_dtype, pipe.dtype)
            # One generator per image, all seeded alike: results do not depend on chunking or batch order.
            generators = [torch.Generator("cpu").manual_seed(seed) for _ in range(stop - start)]

            def after_unet_call():
                progress.update(stop - start)
                services.check_interrupted()

            latents = pipe.segment(part, generator=generators, ensemble_size=ensemble, tta=tta,
                                   callback=after_unet_call)
            return batching.slice_latents(latents, 0, stop - start, keep_on)

        parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), segment_chunk)
        return (batching.concat_latents(parts),)


class DiffDISDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DIFFDIS_MODEL", {"tooltip": "From Load DiffDIS."}),
                "latents": ("DIFFDIS_LATENTS", {"tooltip": "From DiffDIS One-Step Segment."}),
                "normalize": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "The authors' per-image min-max normalisation: stretch each map to the full 0..1 "
                               "range. Off: the raw decoded values."}),
            }
        }

    RETURN_TYPES = ("MASK", "MASK")
    RETURN_NAMES = ("mask", "edge")
    OUTPUT_TOOLTIPS = ("Foreground mask at the original image size: 1 = foreground, 0 = background.",
                       "Edge map of the foreground's outline at the original image size (1 = edge).")
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Decodes the mask and edge latents with the VAE, averages augmented views and noise draws, and "
                   "resizes both maps back to each image's original size. The mask is foreground = 1.")

    def decode(self, model, latents, normalize: bool):
        model = _check_model(model)
        if not all(hasattr(latents, a) for a in ("views", "sizes", "processing_res")):
            raise error(f"latents must come from a DiffDIS One-Step Segment node, got {type(latents).__name__}")
        count = len(latents.sizes)
        draws = latents.views[0].mask_latents.shape[0]
        tta = len(latents.views) > 1
        per_image = batching.decode_bytes(latents.processing_res, model.vae_dtype, 2 * draws, tta)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count)
        keep_on = services.intermediate_device()

        def decode_chunk(start: int, stop: int):
            part = batching.slice_latents(latents, start, stop, pipe.device)
            out = pipe.decode(part, decode_edge=True, minmax=bool(normalize))
            progress.update(stop - start)
            return tensors.maps_to_mask(out.mask).to(keep_on), tensors.maps_to_mask(out.edge).to(keep_on)

        parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), decode_chunk)
        masks, edges = zip(*parts, strict=True)
        return tensors.concat_masks(list(masks)), tensors.concat_masks(list(edges))
