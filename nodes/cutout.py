"""The one-node cutout (DiffDIS Remove Background) and DiffDIS as ComfyUI's BACKGROUND_REMOVAL model.

Both run the three stages per chunk of frames (encode, one UNet step, decode the mask only), so no
condition or latents are kept between stages, under ComfyUI's memory management, with progress and
Cancel as the stage nodes; the mask is brought to the frames' size by the core's cutout
(``diffdis_core.cutout.cutout_rgba``), whose colours Remove Background then takes (refinement.py).
"""

from __future__ import annotations

import torch
from comfy_api.latest import IO

from diffdis_core import spec
from diffdis_core.cutout import REFINE_EDGES, cutout_rgba
from diffdis_core.matting import refines_edges

from . import batching, refinement, schema, services, tensors
from .segmentation import check_model, check_processing_res, encode_chunk, frame_pixels, segment_chunk


def cutout_steps(count: int, tta: bool = False, ensemble_size: int = 1) -> int:
    """Progress steps of cutout_masks for ``count`` frames: encode, each UNet call, decode."""
    return count * (2 + (len(spec.TTA_VIEWS) if tta else 1) * ensemble_size)


def cutout_masks(model, image: torch.Tensor, processing_res: int, seed: int = 0, tta: bool = False,
                 ensemble_size: int = 1, normalize: bool = True, refine_edges: bool = REFINE_EDGES,
                 progress=None) -> torch.Tensor:
    """DiffDIS masks (foreground = 1) of an IMAGE batch, the cutouts' alpha: MASK [B, H, W] on ComfyUI's
    intermediate device. Without ``refine_edges`` (or on frames not larger than the processing size) the
    same values as Encode Condition -> One-Step Segment -> Decode (mask only); with it, masks of larger
    frames follow the frames' edges, from the processing-size mask (better than Apply Alpha can do from a
    MASK at the frame's size). ``progress`` (a bar with room for cutout_steps) is advanced as the stages
    run; by default a bar of its own."""
    tensors.image_to_rgb(image)  # checks the IMAGE before any work
    frames = image if image.ndim == 4 else image[None]
    count = frames.shape[0]
    edges = refine_edges and refines_edges(tuple(frames.shape[1:3]), (processing_res, processing_res))
    per_image = max(batching.encode_bytes(processing_res, model.vae_dtype),
                    batching.segment_bytes(processing_res, model.dtype, model.vae_dtype, tta),
                    batching.decode_bytes(processing_res, model.vae_dtype, tta),
                    refinement.frame_bytes(tuple(frames.shape[1:3]), processing_res, edges) if edges else 0)
    pipe = model.ready(per_image)
    if progress is None:
        progress = services.progress_bar(cutout_steps(count, tta, ensemble_size))
    keep_on = services.intermediate_device()

    def cutout_part(start: int, stop: int) -> torch.Tensor:
        pixels = frame_pixels(pipe, frames[start:stop])
        condition = encode_chunk(pipe, pixels, processing_res, keep_image=tta)
        progress.update(stop - start)
        latents = segment_chunk(pipe, condition, seed, ensemble_size, tta, progress.update)
        del condition
        square = pipe.decode(latents, decode_edge=False, minmax=normalize, output_size=False).mask
        _, alpha = cutout_rgba(pixels, square, refine_edges=edges, refine_foreground=False)
        progress.update(stop - start)
        return alpha[:, 0].to(keep_on)

    with services.cancellable(pipe.unet, pipe.vae):
        parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), cutout_part)
    return tensors.concat_masks(parts)


class DiffDISRemoveBackground(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISRemoveBackground", "DiffDIS Remove Background",
            "Cuts the foreground out of an image in one node: DiffDIS segments it (mask only, at "
            "processing_res) and the mask becomes the image's alpha channel, or the background is replaced "
            "by a colour, with the subject's own colours under soft edges and, on images larger than "
            "processing_res, edges refined at full resolution from the processing-size mask. The stage "
            "nodes (Encode / Segment / Decode -> Apply Alpha) give the same mask; use them for ensembles, "
            "the edge map or threshold, grow and feather.",
            ["cut out", "transparent background", "replace background", "one node", *refinement.SEARCH_ALIASES],
            inputs=[
                schema.model_input(),
                IO.Image.Input("image", tooltip="The image(s) to cut out; a batch (e.g. video frames) runs in chunks "
                                                "that fit in memory. An alpha channel is ignored."),
                schema.processing_res_input(
                    "Side of the square the image is resized to for the model: a multiple of 64 (of 256 "
                    "with TTA). DiffDIS was trained at 1024; lower is faster and coarser."),
                schema.seed_input("Seed of the starting noise; the same seed gives the same mask."),
                IO.Boolean.Input("tta", default=False, tooltip=(
                    "The authors' test-time augmentation (flip x 3 scales, averaged): a little finer, about "
                    "six times slower. Needs a processing_res that is a multiple of 256.")),
                *schema.background_inputs(),
                *schema.refinement_inputs(),
            ],
            outputs=schema.cutout_outputs(
                "RGBA cutout (straight alpha) for 'alpha', otherwise the image on the chosen colour.",
                "The foreground mask at the image size (1 = foreground), edges refined when asked: the "
                "cutout's alpha."))

    @classmethod
    def execute(cls, model, image, processing_res: int, seed: int, tta: bool, background: str,
                custom_color: str, refine_foreground: bool = True, refine_edges: bool = True) -> IO.NodeOutput:
        model = check_model(model)
        tta = bool(tta)
        processing_res = check_processing_res(processing_res, tta=tta)
        color = tensors.background_color(background, custom_color)
        rgb = tensors.image_to_rgb(image)
        count = rgb.shape[0]
        progress = services.progress_bar(cutout_steps(count, tta) + count)  # the stages, then the refinements
        mask = cutout_masks(model, image, processing_res, seed=seed, tta=tta, refine_edges=bool(refine_edges),
                            progress=progress)
        colours, alpha = refinement.refine_cutouts(rgb.to(mask.device), mask, processing_res, False,
                                                   bool(refine_foreground), device=model.load_device,
                                                   progress=progress)
        image, rgb = schema.cutout_images(colours, alpha, color)
        return IO.NodeOutput(image, alpha, rgb)


class DiffDISBackgroundRemoval:
    """DiffDIS as ComfyUI's ``BACKGROUND_REMOVAL`` model (comfy/bg_removal_model.py, ComfyUI >= 0.21):
    what core *Remove Background* takes. ``encode_image(IMAGE)`` gives the foreground mask as that
    node's own models do: float [B, 1, H, W] in 0..1 at the image size, on ComfyUI's intermediate
    device and dtype. Settings are the trained ones: processing size 1024, seed 0, no TTA, and the
    cutout's defaults: on images larger than the processing size the mask's edges are refined at full
    resolution (refine_edges); only a mask leaves here, so colours cannot be refined.
    """

    seed = 0

    def __init__(self, model, processing_res: int = services.DEFAULT_PROCESSING_RES):
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
