"""What the released model and the authors' method fix: file layout, TTA views, processing sizes.

Light on purpose (no torch, no diffusers): the ComfyUI nodes import it at start-up.
"""

from __future__ import annotations

from .errors import DiffDISError

DEFAULT_MODEL = "qianyu1217/diffdis"  # the authors' Hugging Face model repo
DEFAULT_BASE = "stabilityai/sd-turbo"  # VAE / text encoder / scheduler for UNet-only forms

# File layout of a model folder (the released one and what save_pretrained writes).
UNET_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
EMPTY_EMBED_FILE = "empty_text_embed.safetensors"
EMPTY_EMBED_KEY = "empty_text_embed"
# What a download fetches; the text encoder only while the empty-prompt embedding is not cached.
MODEL_FILES = ["unet/config.json", f"unet/{UNET_WEIGHTS_NAMES[0]}", "vae/config.json",
               f"vae/{UNET_WEIGHTS_NAMES[0]}", "scheduler/*"]
TEXT_ENCODER_FILES = ["text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/*"]
# The model-folder layout: every help text (layout_help) and the completeness check
# (loading.missing_model_files) come from this table. Part folder -> the files it holds.
MODEL_FOLDER_LAYOUT = {
    "unet": ("config.json", UNET_WEIGHTS_NAMES[0]),
    "vae": ("config.json", UNET_WEIGHTS_NAMES[0]),
    "scheduler": ("scheduler_config.json",),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"),
}
# Files a model loads without: SD-Turbo's UNet config and noise schedule are built in (configs.py).
BUILT_IN_FILES = ("unet/config.json", "scheduler/scheduler_config.json")
# Read once to make EMPTY_EMBED_FILE, then never again.
TEXT_ENCODER_PARTS = ("text_encoder", "tokenizer")


def part_help(part: str, prefix: str = "") -> str:
    """``<prefix>vae/{config.json, diffusion_pytorch_model.safetensors}``"""
    names = MODEL_FOLDER_LAYOUT[part]
    return f"{prefix}{part}/{names[0]}" if len(names) == 1 else f"{prefix}{part}/{{{', '.join(names)}}}"


def layout_help(prefix: str = "") -> str:
    """What a complete model folder holds, each path starting with ``prefix`` ("DiffDIS/" or "")."""
    return (f"{part_help('unet', prefix)}, {part_help('vae', prefix)}, {part_help('scheduler', prefix)} (optional), "
            f"and {prefix}{EMPTY_EMBED_FILE} or {part_help('text_encoder', prefix)} + {part_help('tokenizer', prefix)}")

# The authors' test-time augmentation in their (ttach) order: flip outer, scale inner.
TTA_VIEWS: tuple[tuple[bool, float], ...] = tuple((flip, scale) for flip in (False, True) for scale in (0.75, 1.0, 1.25))

# Scale-wise injection adds the RGB latents at 1/2, 1/4, 1/8 of the latent side to the UNet's features,
# which line up only when the image side is a multiple of 64. The TTA views at 0.75 and 1.25 of the side
# need that too, which holds exactly when the side is a multiple of 256.
DEFAULT_PROCESSING_RES = 1024  # as trained: every front end's default
PROCESSING_MULTIPLE = 64
TTA_PROCESSING_MULTIPLE = 256
MAX_PROCESSING_RES = 4096


def processing_multiple(tta: bool) -> int:
    return TTA_PROCESSING_MULTIPLE if tta else PROCESSING_MULTIPLE


def check_processing_res(value: object, tta: bool = False, name: str = "processing_res") -> int:
    """``value`` if it is a valid processing resolution (with ``tta``: for all six views), else a
    DiffDISError naming the nearest valid values."""
    multiple = processing_multiple(tta)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DiffDISError(f"{name} must be a whole number (a multiple of {multiple}), got {value!r}")
    if multiple <= value <= MAX_PROCESSING_RES and value % multiple == 0:
        return value
    below = max(multiple, min(MAX_PROCESSING_RES, value) // multiple * multiple)
    above = min(MAX_PROCESSING_RES, max(multiple, -(-value // multiple) * multiple))
    nearest = f"{below}" if below == above else f"{below} or {above}"
    why = " with TTA (its 0.75 and 1.25 views must be multiples of 64 too)" if tta else ""
    raise DiffDISError(f"{name} must be a multiple of {multiple} from {multiple} to {MAX_PROCESSING_RES}{why}, "
                       f"got {value}: use {nearest}")
