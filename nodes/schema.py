"""What the DiffDIS nodes declare alike, on ComfyUI's V3 schema (``comfy_api.latest``): the pack's
link types, the menu category and search words, and the inputs and outputs several nodes share.

ComfyUI validates every value against these declarations (ranges, choices) before a node runs, so
the nodes do not check them again.
"""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import IO

from diffdis_core import spec

from . import refinement, tensors

CATEGORY = "image/segmentation/DiffDIS"  # one menu entry for all DiffDIS nodes
# What people type into the node search for this family (each node adds its own words).
SEARCH_ALIASES = ["diffdis", "remove background", "background removal", "rembg", "cutout", "matting",
                  "segmentation", "alpha", "mask", "DIS", "dichotomous image segmentation"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# The pack's own link types; the names are stored in saved workflows.
Model = IO.Custom("DIFFDIS_MODEL")
Cond = IO.Custom("DIFFDIS_COND")
Latents = IO.Custom("DIFFDIS_LATENTS")
# ComfyUI's own type (IO.BackgroundRemoval from 0.21 on); named here so ComfyUI 0.8 accepts it too.
BackgroundRemoval = IO.Custom("BACKGROUND_REMOVAL")

SCHEMA_FIELDS = {field.name for field in dataclasses.fields(IO.Schema)}


def node_schema(node_id: str, display_name: str, description: str, search_aliases: list[str], inputs: list,
                outputs: list, hidden: list | None = None) -> IO.Schema:
    """A DiffDIS node's schema, in the DiffDIS menu, found by the family's search words and its own."""
    fields = dict(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                  inputs=inputs, outputs=outputs, hidden=hidden or [])
    if "search_aliases" in SCHEMA_FIELDS:  # not in ComfyUI 0.8, whose node search has none
        fields["search_aliases"] = [*SEARCH_ALIASES, *search_aliases]
    return IO.Schema(**fields)


def model_input() -> IO.Input:
    return Model.Input("model", tooltip="From Load DiffDIS.")


def processing_res_input(tooltip: str, optional: bool = False) -> IO.Input:
    """The processing_res widget of every node that takes one: multiples of 64 up to the core's limit
    (the core checks the multiple; TTA needs a multiple of 256)."""
    return IO.Int.Input("processing_res", default=spec.DEFAULT_PROCESSING_RES, min=spec.PROCESSING_MULTIPLE,
                        max=spec.MAX_PROCESSING_RES, step=spec.PROCESSING_MULTIPLE, tooltip=tooltip,
                        optional=optional)


def seed_input(tooltip: str) -> IO.Input:
    return IO.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True, tooltip=tooltip)


def background_inputs() -> list[IO.Input]:
    return [IO.Combo.Input("background", options=tensors.BACKGROUNDS, default="alpha",
                           tooltip=tensors.BACKGROUND_TOOLTIP),
            IO.String.Input("custom_color", default="#3366CC", tooltip=tensors.CUSTOM_COLOR_TOOLTIP)]


def refinement_inputs() -> list[IO.Input]:
    # Optional, so graphs and API prompts saved before they existed still validate.
    return [IO.Boolean.Input("refine_foreground", default=True, optional=True,
                             tooltip=refinement.REFINE_FOREGROUND_TOOLTIP),
            IO.Boolean.Input("refine_edges", default=True, optional=True, tooltip=refinement.REFINE_EDGES_TOOLTIP)]


RGB_BACKGROUND = "white"  # what the rgb output shows behind the subject when background is alpha


def cutout_outputs(image_tooltip: str, mask_tooltip: str) -> list[IO.Output]:
    """image and mask (slots 0 and 1, as saved graphs link them), then the always-RGB image."""
    return [IO.Image.Output("image", tooltip=image_tooltip + " For Save Image (a transparent PNG); many nodes "
                                                             "(VAE Encode, upscalers) drop an alpha channel and "
                                                             "show the old background again: give them rgb."),
            IO.Mask.Output("mask", tooltip=mask_tooltip),
            IO.Image.Output("rgb", tooltip=f"Always RGB: the subject on the chosen background colour ({RGB_BACKGROUND} "
                                           "when background is alpha). Safe for every node that takes an IMAGE.")]


def cutout_images(colours, alpha, color) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and rgb outputs of a cutout: RGBA for ``color`` None (alpha), else both the same
    composite on that colour."""
    image = tensors.apply_background(colours, alpha, color)
    if color is not None:
        return image, image
    return image, tensors.apply_background(colours, alpha, tensors.NAMED_BACKGROUNDS[RGB_BACKGROUND])
