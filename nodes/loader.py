"""Load DiffDIS: a model folder from ComfyUI/models/diffdis (or the one-time download)."""

from __future__ import annotations

from . import models
from .cutout import DiffDISBackgroundRemoval
from .services import CATEGORY, SEARCH_ALIASES


class DiffDISLoader:
    SEARCH_ALIASES = [*SEARCH_ALIASES, "load diffdis", "background removal model", "model loader"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (models.list_models(), {
                    "tooltip": "A model folder in ComfyUI/models/diffdis (unet/, vae/, scheduler/, "
                               f"{models.EMBED_FILE}). '{models.DOWNLOAD_ENTRY}' fetches the released weights "
                               f"into models/diffdis/{models.DOWNLOAD_FOLDER} the first time ({models.DOWNLOAD_SIZE}) "
                               "and uses that folder offline afterwards."}),
                "precision": (models.PRECISIONS, {
                    "default": "auto",
                    "tooltip": "Weight and compute precision. auto: the fastest safe one for the device, as ComfyUI "
                               "judges it on GPUs (bf16 on recent NVIDIA GPUs, else fp16; its --fp16-unet style flags "
                               "apply), and on the CPU bf16 where the CPU computes it natively, else fp32. The VAE "
                               "stays fp32 under fp16 (the SD VAE overflows in fp16)."}),
                "device": (models.DEVICES, {
                    "default": "auto",
                    "tooltip": "auto uses ComfyUI's device (CUDA, Apple MPS, Intel XPU or CPU) and lets ComfyUI "
                               "offload the model when other models need the memory; cpu keeps it on the CPU."}),
            },
            "optional": {
                "compile": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "torch.compile the UNet and VAE: the first run at each size and batch compiles "
                               "(minutes), later runs are faster. Needs Triton on NVIDIA GPUs and a C++ compiler "
                               "on the CPU. Off by default."}),
            },
        }

    # Slot 0 stays DIFFDIS_MODEL (saved workflows link to it). BACKGROUND_REMOVAL is ComfyUI's own type
    # (>= 0.21); older ComfyUIs just have nothing to connect it to.
    RETURN_TYPES = ("DIFFDIS_MODEL", "BACKGROUND_REMOVAL")
    RETURN_NAMES = ("model", "bg_removal_model")
    OUTPUT_TOOLTIPS = ("The DiffDIS UNet and VAE, managed by ComfyUI (Unload Models frees them).",
                       "The same model for ComfyUI's own Remove Background node (ComfyUI 0.21 and newer): a "
                       "mask at processing size 1024, seed 0. DiffDIS Remove Background has the options.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads DiffDIS (ICLR 2025), a one-step diffusion model (fine-tuned SD-Turbo) for high-precision "
                   "dichotomous image segmentation: a foreground mask and an edge map with fine detail such as hair, "
                   "wires and lattices. Model folders are read from ComfyUI/models/diffdis; a complete folder is "
                   "loaded without touching the network.")

    def load(self, model: str, precision: str, device: str, compile: bool = False):
        loaded = models.load(model, precision, device, compile=bool(compile))
        return loaded, DiffDISBackgroundRemoval(loaded)
