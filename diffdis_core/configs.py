"""Configurations the released checkpoint implies but does not always ship.

The authors' Google-Drive UNet comes with SD-Turbo's plain ``unet/config.json`` (or none at all, for
single-file repacks), so the SD-Turbo values are kept here and the DiffDIS changes are applied on top.
The bounds every model-folder config is checked against before use are here too.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import DiffDISError

# stabilityai/sd-turbo unet/config.json (the SD-2.1 architecture).
SD_TURBO_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

# What DiffDIS changes in any UNet2DConditionModel config: RGB latent + noisy latent in, and the
# batch-discriminative embedding as a 4 -> time_embed_dim projection added to the time embedding.
DIFFDIS_CONFIG_OVERRIDES = {
    "in_channels": 8,
    "out_channels": 4,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 4,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
}

# stabilityai/sd-turbo scheduler/scheduler_config.json: only the noise schedule matters for one step.
SD_TURBO_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# The SD latent scale; used when a VAE config does not state it.
LATENT_SCALE_FACTOR = 0.18215


# ---------------------------------------------------------------------------------------------- bounds
# Every model-folder config value that sizes an allocation, or the number of layers built (which costs
# memory even on the meta device), is checked against these before it is used, so a hostile or damaged
# folder costs no more than a good one. Widths are bounded loosely here and exactly by the weights: the
# VAE and UNet are built on the meta device and their shapes compared with the safetensors header
# before any tensor is allocated. The limits are far above every SD / SDXL release.
# At these limits the UNet's meta-device build takes about 5 s and 50 MB (SD's: 0.3 s); SD's weights are 3.4 GB.
MAX_BLOCKS = 6  # SD: 4 blocks per side, SDXL: 3
MAX_LAYERS_PER_BLOCK = 4  # SD UNet and VAE: 2
MAX_TRANSFORMER_LAYERS = 12  # SD: 1, SDXL: 10
MAX_WIDTH = 8192  # SD: 1280 channels, 1024-wide text embedding
MAX_KERNEL = 7  # SD: 3x3 convolutions in and out
MAX_SAMPLE_SIZE = 4096  # in pixels (VAE) or latents (UNet); SD: 768 / 96
MAX_TRAIN_TIMESTEPS = 10_000  # SD: 1000; the schedule holds a few float32 per timestep
MAX_LIST = 64  # latents_mean and the like: one number per latent channel
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")

# Rule kinds: ("int", low, high): a whole number in [low, high]; ("ints", low, high): the same, or a list
# (lists of lists too) of them, at most MAX_BLOCKS per list; ("number", low, high): a finite number strictly
# between; ("numbers", low, high, n): a list of at most n of those; ("names",): a list of at most MAX_BLOCKS
# strings; ("bool",); ("choice", options). null always passes: the library's default.
_MODEL_RULES = {
    "block_out_channels": ("ints", 1, MAX_WIDTH),
    "down_block_types": ("names",),
    "up_block_types": ("names",),
    "layers_per_block": ("ints", 1, MAX_LAYERS_PER_BLOCK),
    "norm_num_groups": ("int", 1, MAX_WIDTH),
    "norm_eps": ("number", 0.0, 1.0),
    "sample_size": ("ints", 1, MAX_SAMPLE_SIZE),
}
UNET_CONFIG_RULES = {
    **_MODEL_RULES,
    "transformer_layers_per_block": ("ints", 1, MAX_TRANSFORMER_LAYERS),
    "reverse_transformer_layers_per_block": ("ints", 1, MAX_TRANSFORMER_LAYERS),
    "attention_head_dim": ("ints", 1, MAX_WIDTH),
    "num_attention_heads": ("ints", 1, MAX_WIDTH),
    "cross_attention_dim": ("ints", 1, MAX_WIDTH),
    "time_embedding_dim": ("int", 1, 4 * MAX_WIDTH),
    "conv_in_kernel": ("int", 1, MAX_KERNEL),
    "conv_out_kernel": ("int", 1, MAX_KERNEL),
    "addition_time_embed_dim": ("int", 1, MAX_WIDTH),
    "addition_embed_type_num_heads": ("int", 1, MAX_WIDTH),
}
VAE_CONFIG_RULES = {
    **_MODEL_RULES,
    "layers_per_block": ("int", 1, MAX_LAYERS_PER_BLOCK),
    "in_channels": ("int", 1, MAX_WIDTH),
    "out_channels": ("int", 1, MAX_WIDTH),
    "latent_channels": ("int", 1, MAX_WIDTH),
    "scaling_factor": ("number", 0.0, math.inf),
    "shift_factor": ("number", -math.inf, math.inf),
    "latents_mean": ("numbers", -math.inf, math.inf, MAX_LIST),
    "latents_std": ("numbers", 0.0, math.inf, MAX_LIST),
    "force_upcast": ("bool",),
    "use_quant_conv": ("bool",),
    "use_post_quant_conv": ("bool",),
    "mid_block_add_attention": ("bool",),
}
SCHEDULER_CONFIG_RULES = {
    "num_train_timesteps": ("int", 1, MAX_TRAIN_TIMESTEPS),
    "beta_start": ("number", 0.0, 1.0),
    "beta_end": ("number", 0.0, 1.0),
    "beta_schedule": ("choice", BETA_SCHEDULES),
    "trained_betas": ("numbers", 0.0, 1.0, MAX_TRAIN_TIMESTEPS),
    "rescale_betas_zero_snr": ("bool",),
}


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low < value < high)


def _between(low: float, high: float) -> str:
    if math.isinf(low) and math.isinf(high):
        return "a finite number"
    return f"a number above {low:g}" if math.isinf(high) else f"a number between {low:g} and {high:g}"


def _rule_problem(value: Any, rule: tuple) -> str | None:
    """What ``value`` must be under ``rule``, in words; None when it is that."""
    kind = rule[0]
    if kind == "int":
        return None if _is_int(value, rule[1], rule[2]) else f"a whole number from {rule[1]} to {rule[2]}"
    if kind == "ints":
        pending = [(value, 0)]
        while pending:  # iterative, and at most two list levels deep
            item, depth = pending.pop()
            if isinstance(item, list) and depth < 2 and len(item) <= MAX_BLOCKS:
                pending.extend((child, depth + 1) for child in item)
            elif not _is_int(item, rule[1], rule[2]):
                return f"a whole number from {rule[1]} to {rule[2]}, or a list of at most {MAX_BLOCKS} of them"
        return None
    if kind == "number":
        return None if _is_number(value, rule[1], rule[2]) else _between(rule[1], rule[2])
    if kind == "numbers":
        if isinstance(value, list) and len(value) <= rule[3] and all(_is_number(x, rule[1], rule[2]) for x in value):
            return None
        return f"a list of at most {rule[3]} numbers, each {_between(rule[1], rule[2])[2:]}"
    if kind == "names":
        if isinstance(value, list) and len(value) <= MAX_BLOCKS and all(isinstance(x, str) for x in value):
            return None
        return f"a list of at most {MAX_BLOCKS} block names"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "choice":
        return None if value in rule[1] else f"one of {', '.join(rule[1])}"
    raise AssertionError(f"unknown rule kind {kind}")


def check_config(config: dict[str, Any], rules: dict[str, tuple], source: Any) -> dict[str, Any]:
    """``config`` when every value ``rules`` names is within its bounds (null: the library default), else a
    DiffDISError naming ``source`` (the file), the key and what it must be."""
    for key, rule in rules.items():
        value = config.get(key)
        if value is None:
            continue
        problem = _rule_problem(value, rule)
        if problem is not None:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise DiffDISError(f"{source}: {key} is {shown}, it must be {problem}; is the file damaged or "
                               "from another kind of model?")
    return config
