"""Load DiffDIS: a model folder from ComfyUI/models/diffdis (or the one-time download)."""

from __future__ import annotations

from . import models
from .services import CATEGORY


class DiffDISLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (models.list_models(), {
                    "tooltip": "A model folder in ComfyUI/models/diffdis (unet/, vae/, scheduler/, "
                               f"{models.EMBED_FILE}). '{models.DOWNLOAD_ENTRY}' fetches the released weights "
                               f"into models/diffdis/{models.DOWNLOAD_FOLDER} the first time (about 4 GB plus the "
                               "1.4 GB text encoder, needed once) and uses that folder offline afterwards."}),
                "precision": (models.PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Weight and compute precision. auto follows ComfyUI: fp16 on GPUs that handle it "
                               "well, fp32 on the CPU. The VAE stays fp32 under fp16 (the SD VAE overflows in fp16)."}),
                "device": (models.DEVICES, {
                    "default": "auto",
                    "tooltip": "auto uses ComfyUI's device (CUDA, Apple MPS, Intel XPU or CPU) and lets ComfyUI "
                               "offload the model when other models need the memory; cpu keeps it on the CPU."}),
            }
        }

    RETURN_TYPES = ("DIFFDIS_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The DiffDIS UNet and VAE, managed by ComfyUI (Unload Models frees them).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads DiffDIS (ICLR 2025), a one-step diffusion model (fine-tuned SD-Turbo) for high-precision "
                   "dichotomous image segmentation: a foreground mask and an edge map with fine detail such as hair, "
                   "wires and lattices. Model folders are read from ComfyUI/models/diffdis; a complete folder is "
                   "loaded without touching the network.")

    def load(self, model: str, precision: str, device: str):
        return (models.load(model, precision, device),)
