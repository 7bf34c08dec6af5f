"""The three stages of DiffDIS as nodes: encode the image, one UNet step, decode mask and edge.

Each node is a thin loop over the core pipeline's stage of the same name: it asks ComfyUI to load
the model, splits the batch into chunks that fit in memory and time, reports progress, honours
Cancel, and keeps its result on ComfyUI's intermediate device (the CPU) so no VRAM is held between
nodes. The per-chunk stage functions here are shared with the one-node cutout (cutout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import IO

from diffdis_core import spec

from . import batching, schema, services, tensors
from .checks import core, error
from .models import DiffDISModel

AUTO, MASK_ONLY, MASK_AND_EDGE = "auto", "mask only", "mask and edge"
DECODE_CHOICES = [AUTO, MASK_ONLY, MASK_AND_EDGE]
EDGE_SLOT = 1  # DiffDISDecode's edge output
# Added by mark_edge_use to the prompt's auto Decode nodes: part of ComfyUI's cache key, not an input.
EDGE_USE_KEY = "edge_output_linked"


def check_model(model) -> DiffDISModel:
    if not isinstance(model, DiffDISModel):
        raise error(f"model must come from a Load DiffDIS node, got {type(model).__name__}")
    return model


def check_processing_res(value, tta: bool = False) -> int:
    """The core's size rule (a multiple of 64; with TTA of 256), raised as one line on the node."""
    return spec.check_processing_res(value, tta=tta)


@dataclass
class FrameConditions:
    """What flows along a DIFFDIS_COND link: the frames' multi-scale RGB latents, on ComfyUI's
    intermediate device, and the frames themselves as given (a reference to the IMAGE ComfyUI holds
    anyway, not a copy). The processing-size images are not kept (12.6 MB per 1024² frame): the
    plain view needs only the latents, and TTA makes its views again from the frames."""

    rgb_latents: list[torch.Tensor]  # [B, 4, R/8 / 2^k, ...] for k = 0..3
    sizes: list[tuple[int, int]]  # each frame's (height, width)
    processing_res: int
    frames: torch.Tensor  # the IMAGE [B, H, W, C] given to Encode Condition

    def __len__(self) -> int:
        return len(self.sizes)


def generators(seed: int, count: int) -> list[torch.Generator]:
    # One generator per image, all seeded alike: results depend neither on chunking nor on batch order.
    return [torch.Generator("cpu").manual_seed(seed) for _ in range(count)]


def frame_pixels(pipe, frames: torch.Tensor) -> torch.Tensor:
    """IMAGE frames as the core's [B, 3, H, W] on the pipeline's device."""
    return tensors.image_to_pixels(frames).to(pipe.device)


def encode_chunk(pipe, pixels: torch.Tensor, processing_res: int, keep_image: bool = True):
    """The core condition of frames (``frame_pixels``); ``keep_image`` keeps the processing-size image,
    which only test-time augmentation needs."""
    return pipe.encode_condition(pixels, processing_res, keep_image=keep_image)


def core_condition(pipe, cond: FrameConditions, start: int, stop: int):
    """The core's condition for frames ``start:stop`` from the kept latents (no image: no TTA)."""
    latents = [latent[start:stop].to(device=pipe.device, dtype=pipe.dtype) for latent in cond.rgb_latents]
    return core().DiffDISCondition(None, latents, list(cond.sizes[start:stop]))


def segment_chunk(pipe, condition, seed: int, ensemble_size: int, tta: bool, after_unet_call):
    """One-step predictions for a core condition; ``after_unet_call(n)`` after each UNet call of n images."""
    count = len(condition.sizes)
    return pipe.segment(condition, generator=generators(seed, count), ensemble_size=ensemble_size, tta=tta,
                        callback=lambda: after_unet_call(count))


def decode_chunk(pipe, latents, decode_edge: bool, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MASKs [B, H, W] of the mask (and the edge, or None) at the frames' size."""
    out = pipe.decode(latents, decode_edge=decode_edge, minmax=normalize)
    edge = tensors.maps_to_mask(out.edge) if decode_edge else None
    return tensors.maps_to_mask(out.mask), edge


def edge_output_linked(prompt, unique_id) -> bool | None:
    """Whether a node of the API-format ``prompt`` takes the edge output of node ``unique_id`` (links are
    [node id, output index]); None when that cannot be told (no prompt, or the node is not in it)."""
    if not isinstance(prompt, dict) or unique_id is None or str(unique_id) not in prompt:
        return None
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in (inputs.values() if isinstance(inputs, dict) else ()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(unique_id) and \
                    value[1] == EDGE_SLOT:
                return True
    return False


def mark_edge_use(request: dict) -> dict:
    """ComfyUI on-prompt handler (POST /prompt): writes into each Decode node set to auto whether its edge
    output is linked. ComfyUI caches a node's outputs by its inputs and ancestors, never by what uses them:
    without this, linking the edge output after a run would get the cached empty edge."""
    prompt = request.get("prompt") if isinstance(request, dict) else None
    for node_id, node in (prompt.items() if isinstance(prompt, dict) else ()):
        if not isinstance(node, dict) or node.get("class_type") != "DiffDISDecode":
            continue
        inputs = node.get("inputs")
        decode = inputs.get("decode", AUTO) if isinstance(inputs, dict) else None
        if decode == AUTO or isinstance(decode, list):  # auto, or a value that arrives by link
            inputs[EDGE_USE_KEY] = bool(edge_output_linked(prompt, node_id))
    return request


class DiffDISEncodeCondition(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISEncodeCondition", "DiffDIS Encode Condition",
            "Encodes the image into what DiffDIS is conditioned on: the VAE latents of the image resized to "
            "processing_res, at four scales. Feed it to DiffDIS One-Step Segment.",
            ["encode image", "condition"],
            inputs=[
                schema.model_input(),
                IO.Image.Input("image", tooltip="The image(s) to segment; a batch (e.g. video frames) is processed "
                                                "in chunks that fit in memory. An alpha channel is ignored."),
                schema.processing_res_input(
                    "Side of the square the image is resized to for the model: a multiple of 64 (of 256 "
                    "with TTA). DiffDIS was trained at 1024; the mask is resized back to the image size."),
            ],
            outputs=[schema.Cond.Output("cond", tooltip="The image's VAE latents at full, 1/2, 1/4 and 1/8 size, "
                                                        "and each image's original size.")])

    @classmethod
    def execute(cls, model, image, processing_res: int) -> IO.NodeOutput:
        model = check_model(model)
        processing_res = check_processing_res(processing_res)
        tensors.image_to_rgb(image)  # checks the IMAGE before any work
        count = image.shape[0] if image.ndim == 4 else 1
        frames = image if image.ndim == 4 else image[None]
        per_image = batching.encode_bytes(processing_res, model.vae_dtype)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count)
        keep_on = services.intermediate_device()

        def encode_part(start: int, stop: int):
            condition = encode_chunk(pipe, frame_pixels(pipe, frames[start:stop]), processing_res, keep_image=False)
            progress.update(stop - start)
            return [latent.to(keep_on) for latent in condition.rgb_latents], condition.sizes

        with services.cancellable(pipe.vae):
            parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), encode_part)
        latents = [torch.cat(scale) for scale in zip(*(p[0] for p in parts), strict=True)]
        sizes = [size for p in parts for size in p[1]]
        return IO.NodeOutput(FrameConditions(latents, sizes, processing_res, frames))


class DiffDISOneStepSegment(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISOneStepSegment", "DiffDIS One-Step Segment",
            "Runs DiffDIS's single denoising step: from noise at t = 999 the UNet predicts the mask and edge "
            "latents together, conditioned on the image. Decode them with DiffDIS Decode Mask/Edge.",
            ["segment", "one step", "unet"],
            inputs=[
                schema.model_input(),
                schema.Cond.Input("cond", tooltip="From DiffDIS Encode Condition."),
                schema.seed_input(
                    "Seed of the starting noise. The same seed gives the same mask; every image of a batch "
                    "starts from the same noise, so a frame's mask does not depend on its batch."),
                IO.Int.Input("ensemble", default=1, min=1, max=16, tooltip=(
                    "Combine this many noise draws, as the authors do: each aligned by a scale and "
                    "shift, then their median (each draw costs one more UNet step and decode).")),
                IO.Boolean.Input("tta", default=False, tooltip=(
                    "The authors' test-time augmentation: horizontal flip x scales 0.75, 1 and 1.25, "
                    "averaged (about six times slower; the setting of the paper's evaluation). Needs a "
                    "processing_res that is a multiple of 256.")),
            ],
            outputs=[schema.Latents.Output("latents", tooltip="The predicted mask and edge latents (per augmented "
                                                              "view and noise draw).")])

    @classmethod
    def execute(cls, model, cond, seed: int, ensemble: int, tta: bool) -> IO.NodeOutput:
        model = check_model(model)
        if not isinstance(cond, FrameConditions):
            raise error(f"cond must come from a DiffDIS Encode Condition node, got {type(cond).__name__}")
        tta = bool(tta)
        if tta:
            check_processing_res(cond.processing_res, tta=True)
        count = len(cond)
        per_image = batching.segment_bytes(cond.processing_res, model.dtype, model.vae_dtype, tta)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count * ensemble * (len(spec.TTA_VIEWS) if tta else 1))
        keep_on = services.intermediate_device()

        def segment_part(start: int, stop: int):
            if tta:
                condition = encode_chunk(pipe, frame_pixels(pipe, cond.frames[start:stop]), cond.processing_res)
            else:
                condition = core_condition(pipe, cond, start, stop)
            latents = segment_chunk(pipe, condition, seed, ensemble, tta, progress.update)
            return batching.slice_latents(latents, 0, stop - start, keep_on)

        with services.cancellable(pipe.unet, pipe.vae):
            parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), segment_part)
        return IO.NodeOutput(batching.concat_latents(parts))


class DiffDISDecode(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISDecode", "DiffDIS Decode Mask/Edge",
            "Decodes the mask (and, when used or asked, the edge) latents with the VAE, averages augmented "
            "views and noise draws, and resizes the maps back to each image's original size. The mask is "
            "foreground = 1.",
            ["decode mask", "edge map", "matte"],
            inputs=[
                schema.model_input(),
                schema.Latents.Input("latents", tooltip="From DiffDIS One-Step Segment."),
                IO.Boolean.Input("normalize", default=True, tooltip=(
                    "The authors' per-image min-max normalisation: stretch each map to the full 0..1 "
                    "range. Off: the raw decoded values.")),
                # Optional, so graphs saved before it existed still validate; they get auto, which decodes the
                # edge exactly when they use it.
                IO.Combo.Input("decode", options=DECODE_CHOICES, default=AUTO, optional=True, tooltip=(
                    "auto: the edge map too only when the edge output is connected. mask only: one VAE "
                    "decode per image; the edge output is an empty (all 0) mask. mask and edge: also "
                    "decode the edge map (about 45% more work).")),
            ],
            outputs=[
                IO.Mask.Output("mask", tooltip="Foreground mask at the original image size: 1 = foreground, "
                                               "0 = background."),
                IO.Mask.Output("edge", tooltip="Edge map of the foreground's outline at the original image size "
                                               "(1 = edge); with decode 'mask only' an empty (all 0) mask."),
            ],
            hidden=[IO.Hidden.prompt, IO.Hidden.unique_id])  # for auto: is the edge output linked?

    @classmethod
    def execute(cls, model, latents, normalize: bool, decode: str = AUTO) -> IO.NodeOutput:
        model = check_model(model)
        if not all(hasattr(latents, a) for a in ("views", "sizes", "processing_res")):
            raise error(f"latents must come from a DiffDIS One-Step Segment node, got {type(latents).__name__}")
        if decode == AUTO:  # unknown (called outside a prompt): both maps, as before the option existed
            hidden = cls.hidden
            with_edge = edge_output_linked(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)) \
                is not False
        else:
            with_edge = decode == MASK_AND_EDGE
        count = len(latents.sizes)
        tta = len(latents.views) > 1
        per_image = batching.decode_bytes(latents.processing_res, model.vae_dtype, tta)
        pipe = model.ready(per_image)
        progress = services.progress_bar(count)
        keep_on = services.intermediate_device()

        def decode_part(start: int, stop: int):
            part = batching.slice_latents(latents, start, stop, pipe.device)
            mask, edge = decode_chunk(pipe, part, with_edge, bool(normalize))
            progress.update(stop - start)
            mask = mask.to(keep_on)
            return mask, (edge.to(keep_on) if edge is not None else torch.zeros_like(mask))

        with services.cancellable(pipe.vae):
            parts = batching.run_in_chunks(count, batching.chunk_size(per_image, pipe.device), decode_part)
        masks, edges = zip(*parts, strict=True)
        return IO.NodeOutput(tensors.concat_masks(list(masks)), tensors.concat_masks(list(edges)))
