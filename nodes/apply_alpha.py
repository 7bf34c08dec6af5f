"""DiffDIS Apply Alpha: turn an image and its mask into a cutout (RGBA) or a composite on a colour."""

from __future__ import annotations

from comfy_api.latest import IO

from diffdis_core import spec

from . import refinement, schema, services, tensors


class DiffDISApplyAlpha(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISApplyAlpha", "DiffDIS Apply Alpha",
            "Cuts the foreground out: the mask (edges refined to the full image size, then optional threshold, "
            "invert, grow/shrink and feather) becomes the image's alpha channel, or the background is replaced "
            "by a solid colour; under soft edges the subject's own colours are estimated so no fringe of the "
            "old background remains.",
            ["apply mask", "transparent background", "replace background", "composite", "join image with alpha",
             *refinement.SEARCH_ALIASES],
            inputs=[
                IO.Image.Input("image", tooltip="The image to cut out (an alpha channel it has is replaced)."),
                IO.Mask.Input("mask", tooltip=(
                    "Foreground = 1, as DiffDIS Decode gives it. Note: core Join Image with Alpha expects "
                    "the inverse (it computes alpha = 1 - mask); this node takes the mask as is. A mask of "
                    "another size is resized to the image; one mask is reused for every image.")),
                *schema.background_inputs(),
                IO.Int.Input("mask_blur", default=0, min=0, max=256, step=1, tooltip=(
                    "Feather the mask edge with a Gaussian of this radius in pixels (0 = off).")),
                IO.Int.Input("mask_expand", default=0, min=-256, max=256, step=1, tooltip=(
                    "Grow (+) or shrink (-) the kept region by this many pixels before feathering.")),
                IO.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "0 keeps the soft mask (fine hair and semi-transparency); above 0 the mask becomes "
                    "hard: 1 where it is at least this value, else 0.")),
                IO.Boolean.Input("invert", default=False,
                                 tooltip="Keep the background and remove the foreground instead."),
                *schema.refinement_inputs(),
                schema.processing_res_input(
                    "The size the mask was predicted at: set it to DiffDIS Encode Condition's "
                    "processing_res (a MASK does not carry it). Used by refine_edges only.", optional=True),
            ],
            outputs=schema.cutout_outputs(
                "RGBA cutout (straight alpha) for 'alpha', otherwise the image composited on the chosen colour.",
                "The refined mask that was applied (1 = kept)."))

    @classmethod
    def execute(cls, image, mask, background: str, custom_color: str, mask_blur: int, mask_expand: int,
                threshold: float, invert: bool, refine_foreground: bool = True, refine_edges: bool = True,
                processing_res: int = spec.DEFAULT_PROCESSING_RES) -> IO.NodeOutput:
        color = tensors.background_color(background, custom_color)
        processing_res = spec.check_processing_res(processing_res)
        rgb = tensors.image_to_rgb(image)
        mask = tensors.to_mask(mask).to(rgb.device)
        rgb, mask = tensors.match_batch(rgb, mask)
        colours, alpha = refinement.refine_cutouts(
            rgb, mask, processing_res, bool(refine_edges), bool(refine_foreground),
            device=services.choose_devices("auto")[0],
            adjust=lambda m: tensors.refine_mask(m, threshold, bool(invert), mask_expand, mask_blur),
            progress=services.progress_bar(rgb.shape[0]))
        image, rgb = schema.cutout_images(colours, alpha, color)
        return IO.NodeOutput(image, alpha, rgb)
