"""Load DiffDIS: a model folder from ComfyUI/models/diffdis (or the one-time download)."""

from __future__ import annotations

from comfy_api.latest import IO

from . import models, schema
from .cutout import DiffDISBackgroundRemoval


class DiffDISLoader(IO.ComfyNode):
    @classmethod
    def define_schema(cls) -> IO.Schema:
        return schema.node_schema(
            "DiffDISLoader", "Load DiffDIS",
            "Loads DiffDIS (ICLR 2025), a one-step diffusion model (fine-tuned SD-Turbo) for high-precision "
            "dichotomous image segmentation: a foreground mask and an edge map with fine detail such as hair, "
            "wires and lattices. Model folders are read from ComfyUI/models/diffdis; a complete folder is "
            "loaded without touching the network.",
            ["load diffdis", "background removal model", "model loader"],
            inputs=[
                IO.Combo.Input("model", options=models.list_models(), tooltip=(
                    "A model folder in ComfyUI/models/diffdis (unet/, vae/, scheduler/, "
                    f"{models.EMBED_FILE}). '{models.DOWNLOAD_ENTRY}' fetches the released weights "
                    f"into models/diffdis/{models.DOWNLOAD_FOLDER} the first time ({models.DOWNLOAD_SIZE}) "
                    "and uses that folder offline afterwards.")),
                IO.Combo.Input("precision", options=models.PRECISIONS, default="auto", tooltip=(
                    "Weight and compute precision. auto: the fastest safe one for the device, as ComfyUI "
                    "judges it on GPUs (bf16 on recent NVIDIA GPUs, else fp16; its --fp16-unet style flags "
                    "apply), and on the CPU bf16 where the CPU computes it natively, else fp32. The VAE "
                    "stays fp32 under fp16 (the SD VAE overflows in fp16).")),
                IO.Combo.Input("device", options=models.DEVICES, default="auto", tooltip=(
                    "auto uses ComfyUI's device (CUDA, Apple MPS, Intel XPU or CPU) and lets ComfyUI "
                    "offload the model when other models need the memory; cpu keeps it on the CPU.")),
                IO.Boolean.Input("compile", default=False, optional=True, tooltip=(
                    "torch.compile the UNet and VAE: the first run at each size and batch compiles "
                    "(minutes), later runs are faster. Needs Triton on NVIDIA GPUs and a C++ compiler "
                    "on the CPU. Off by default.")),
            ],
            # Slot 0 stays DIFFDIS_MODEL (saved workflows link to it).
            outputs=[
                schema.Model.Output("model", tooltip="The DiffDIS UNet and VAE, managed by ComfyUI (Unload Models "
                                                     "frees them)."),
                schema.BackgroundRemoval.Output("bg_removal_model", tooltip=(
                    "The same model for ComfyUI's own Remove Background node (ComfyUI 0.21 and newer): a "
                    "mask at processing size 1024, seed 0. DiffDIS Remove Background has the options.")),
            ])

    @classmethod
    def execute(cls, model: str, precision: str, device: str, compile: bool = False) -> IO.NodeOutput:
        loaded = models.load(model, precision, device, compile=bool(compile))
        return IO.NodeOutput(loaded, DiffDISBackgroundRemoval(loaded))
