"""Configurations the released checkpoint implies but does not always ship.

The authors' Google-Drive UNet comes with SD-Turbo's plain ``unet/config.json`` (or none at all, for
single-file repacks), so the SD-Turbo values are kept here and the DiffDIS changes are applied on top.
"""

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
