"""The DiffDIS UNet on stock diffusers.

DiffDIS is SD-2.1's ``UNet2DConditionModel`` with four changes (see the spec):
1. ``conv_in`` takes ``cat([rgb_latent, noisy_latent])`` (8 channels);
2. the batch-discriminative embedding (BDE): ``class_embed_type="projection"`` with 4 inputs;
3. DBIA: the mid block's transformer block gets a mutual mask<->edge attention (``norm2_``, ``attn3``)
   between its self-attention and its text cross-attention;
4. SWCI: after down blocks 0..2 the last skip tensor is modulated by the RGB latent of the matching
   scale (``rgb_conv``, ``rgb_proj``, ``rgb_proj1``).
Parameter names equal the authors' so their released state dict loads unchanged.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .configs import DIFFDIS_CONFIG_OVERRIDES, SD_TURBO_UNET_CONFIG
from .errors import DiffDISError
from .files import pickle_refusal, read_safetensors

# Keys a single-file repack (set-soft/RemBG ``DiffDIS_F16.safetensors``) adds around the UNet.
REPACK_UNET_PREFIX = "unet."
REPACK_EMBED_KEY = "positive"


class DBIATransformerBlock(BasicTransformerBlock):
    """The mid block's transformer block with Detail-Balancing Interactive Attention.

    The batch is ``[mask stream; edge stream]``; after self-attention, each half's queries attend to
    the other half's keys and values (mask <- edge, edge <- mask), then text cross-attention and the
    feed-forward follow as in SD.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, **kwargs: Any):
        if kwargs.get("norm_type", "layer_norm") != "layer_norm":
            raise ValueError("DiffDIS's DBIA block is defined for norm_type 'layer_norm' (SD 2.1) only")
        super().__init__(dim, num_attention_heads, attention_head_dim, **kwargs)
        self.norm2_ = nn.LayerNorm(dim, eps=kwargs.get("norm_eps", 1e-5),
                                   elementwise_affine=kwargs.get("norm_elementwise_affine", True))
        self.attn3 = Attention(
            query_dim=dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            bias=kwargs.get("attention_bias", False),
            upcast_attention=kwargs.get("upcast_attention", False),
        )

    def mutual_attention(self, norm_hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if norm_hidden_states.shape[0] % 2:
            raise ValueError(
                f"DBIA needs the batch [mask; edge] (an even batch), got {norm_hidden_states.shape[0]} items")
        mask, edge = norm_hidden_states.chunk(2)
        return torch.cat([self.attn3(mask, encoder_hidden_states=edge, **kwargs),
                          self.attn3(edge, encoder_hidden_states=mask, **kwargs)])

    # Same signature as BasicTransformerBlock.forward: Transformer2DModel calls it positionally.
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        kwargs = dict(cross_attention_kwargs or {})
        kwargs.pop("scale", None)
        hidden_states = self.attn1(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs) + hidden_states
        hidden_states = self.mutual_attention(self.norm2_(hidden_states), **kwargs) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=encoder_attention_mask, **kwargs) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class ChunkedFeedForward(FeedForward):
    """A transformer block's feed-forward run on ``chunk_tokens`` tokens at a time in inference: it works per
    token, so the values are the same, and its inner activation (4x wide, GEGLU's 8x before the gate) is a
    chunk's, not the whole sequence's: at 1024², 2 x 16384 tokens x 2560 = 160 MiB in bfloat16 (plus the
    gate's and the product's 80 MiB each), the UNet's largest activation. diffusers' own chunking
    (``_chunked_feed_forward``) needs the length to be a multiple of the chunk, which no single size is for
    every processing resolution and level."""

    chunk_tokens = 1024

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tokens = hidden_states.shape[1] if hidden_states.dim() == 3 else 0
        if torch.is_grad_enabled() or args or kwargs or tokens <= self.chunk_tokens:
            return super().forward(hidden_states, *args, **kwargs)
        output = None
        for start in range(0, tokens, self.chunk_tokens):
            chunk = super().forward(hidden_states[:, start:start + self.chunk_tokens])
            if output is None:
                output = chunk.new_empty(*hidden_states.shape[:2], chunk.shape[-1])
            output[:, start:start + chunk.shape[1]] = chunk
        return output


def chunk_feed_forwards(unet: nn.Module) -> None:
    """Make every transformer feed-forward of ``unet`` a ``ChunkedFeedForward`` (in place; parameters kept)."""
    for module in unet.modules():
        if type(module) is FeedForward:
            module.__class__ = ChunkedFeedForward


def _dbia_block_like(block: BasicTransformerBlock, transformer_config: Any) -> DBIATransformerBlock:
    c = transformer_config
    return DBIATransformerBlock(
        block.dim,
        block.num_attention_heads,
        block.attention_head_dim,
        dropout=c.dropout,
        cross_attention_dim=c.cross_attention_dim,
        activation_fn=c.activation_fn,
        attention_bias=c.attention_bias,
        only_cross_attention=c.only_cross_attention,
        double_self_attention=c.double_self_attention,
        upcast_attention=c.upcast_attention,
        norm_type="layer_norm",
        norm_elementwise_affine=c.norm_elementwise_affine,
        norm_eps=c.norm_eps,
    )


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class DiffDISUNet(UNet2DConditionModel):
    """SD-2.1 UNet with DiffDIS's BDE, DBIA and SWCI; any UNet2DConditionModel config works.

    Whatever ``in_channels`` / class-embedding fields the given config has, the DiffDIS ones
    (8 input channels, a 4-input projection class embedding) are applied, so SD-Turbo's plain
    ``config.json`` builds the DiffDIS architecture.
    """

    # Keep diffusers' config machinery (from_config, save_pretrained) seeing the base signature.
    @functools.wraps(UNet2DConditionModel.__init__)
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.update(DIFFDIS_CONFIG_OVERRIDES)
        super().__init__(*args, **kwargs)
        widths = list(self.config.block_out_channels[:3])
        latent_channels = self.config.out_channels
        # SWCI heads; rgb_proj/rgb_proj1 start at zero so a fresh model equals its base UNet.
        self.rgb_conv = nn.ModuleList(
            nn.Sequential(_conv3x3(latent_channels, c), nn.BatchNorm2d(c), nn.GELU()) for c in widths)
        self.rgb_proj = nn.ModuleList(_conv3x3(c, c) for c in widths)
        self.rgb_proj1 = nn.ModuleList(_conv3x3(c, c) for c in widths)
        for conv in [*self.rgb_proj, *self.rgb_proj1]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        # DBIA lives in the mid block's transformer blocks only.
        for transformer in getattr(self.mid_block, "attentions", []):
            transformer.transformer_blocks = nn.ModuleList(
                _dbia_block_like(block, transformer.config) for block in transformer.transformer_blocks)

    # ------------------------------------------------------------------ forward
    def swci(self, index: int, skip: torch.Tensor, rgb_token: torch.Tensor) -> torch.Tensor:
        """Scale-wise conditional injection into the skip tensor of down block ``index``."""
        if rgb_token.shape[-2:] != skip.shape[-2:]:
            # Only for processing sizes that are not multiples of 64; the released recipe never hits it.
            rgb_token = F.interpolate(rgb_token, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        features = self.rgb_conv[index](rgb_token.to(skip.dtype))
        return skip * self.rgb_proj[index](features) + self.rgb_proj1[index](features) + skip

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        rgb_token: Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """The authors' call: ``unet(cat([rgb, noisy]), t, text, class_labels=BDE, rgb_token=[1, 1/2, 1/4, 1/8])``.

        ``rgb_token`` holds the RGB latents at full, 1/2, 1/4 and 1/8 of the image side; the last
        three are injected after down blocks 0, 1, 2.
        """
        if class_labels is None:
            raise ValueError("DiffDISUNet needs class_labels: the BDE inputs [sin, sin, cos, cos] per item")
        if rgb_token is None or len(rgb_token) < len(self.rgb_conv) + 1:
            raise ValueError("DiffDISUNet needs rgb_token: the RGB latents at full, 1/2, 1/4 and 1/8 size")
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        # Latent sizes that are not multiples of 2**num_upsamplers need explicit upsample sizes.
        forward_upsample_size = any(s % 2 ** self.num_upsamplers for s in sample.shape[-2:])

        # 1. time + batch-discriminative embedding
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep))
        emb = emb + self.get_class_embed(sample=sample, class_labels=class_labels.to(sample.dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # 2. pre-process
        sample = self.conv_in(sample)

        # 3. down, with SWCI on the last skip tensor of the first blocks (the skip copy only)
        cross = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for index, block in enumerate(self.down_blocks):
            if getattr(block, "has_cross_attention", False):
                sample, res_samples = block(hidden_states=sample, temb=emb, **cross)
            else:
                sample, res_samples = block(hidden_states=sample, temb=emb)
            if index < len(self.rgb_conv):
                res_samples = (*res_samples[:-1], self.swci(index, res_samples[-1], rgb_token[index + 1]))
            skips += res_samples

        # 4. mid (DBIA inside)
        sample = self.mid_block(sample, emb, **cross)

        # 5. up
        for block in self.up_blocks:
            res_samples, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and skips else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                               upsample_size=upsample_size, **cross)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                               upsample_size=upsample_size)

        # 6. post-process
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sd_turbo(cls, base: UNet2DConditionModel) -> DiffDISUNet:
        """The training start (spec, training recipe) from an SD-Turbo (or any SD-2.x) UNet.

        conv_in is widened to 8 channels (weights repeated and halved, bias kept); the mid block's
        attn3/norm2_ start as copies of attn1/norm1; SWCI output convs start at zero; the BDE
        projection and rgb_conv start from PyTorch's default initialisation.
        """
        model = cls.from_config({k: v for k, v in base.config.items() if not k.startswith("_")})
        state = dict(base.state_dict())
        conv_in = state["conv_in.weight"]
        if conv_in.shape[1] != 4:
            raise DiffDISError(f"expected a 4-channel SD UNet to start from, its conv_in has {conv_in.shape[1]}")
        state["conv_in.weight"] = torch.cat([conv_in, conv_in], dim=1) / 2
        for key, value in list(state.items()):
            if key.startswith("mid_block.") and ".transformer_blocks." in key:
                if ".attn1." in key:
                    state[key.replace(".attn1.", ".attn3.")] = value.clone()
                elif ".norm1." in key:
                    state[key.replace(".norm1.", ".norm2_.")] = value.clone()
        missing, unexpected = model.load_state_dict(state, strict=False)
        fresh = ("class_embedding.", "rgb_conv.", "rgb_proj.", "rgb_proj1.")
        missing = [k for k in missing if not k.startswith(fresh)]
        if missing or unexpected:
            raise DiffDISError(f"the base UNet does not match its config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules this model does not have.
        return torch.nn.Module.to(model, base.dtype)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        config: dict[str, Any] | None = None,
        **hub_kwargs: Any,
    ) -> DiffDISUNet:
        """Load the released UNet strictly, whatever its config.json says.

        ``pretrained_model_name_or_path`` is a folder (``subfolder="unet"`` for a model folder), a
        Hugging Face repo id, or a single ``.safetensors`` file (also the repack with ``unet.``-prefixed
        keys). ``config`` is used when the location has no config.json (default: SD-Turbo's).
        ``hub_kwargs`` go to huggingface-hub (``cache_dir``, ``local_files_only``, ``revision``, ``token``).
        """
        from .hub import resolve_unet_files
        from .loading import read_unet_config

        config_path, weights_path = resolve_unet_files(pretrained_model_name_or_path, subfolder, **hub_kwargs)
        if config_path is not None:
            config = read_unet_config(config_path)
        unet_state, _ = read_unet_state_dict(weights_path, torch_dtype)
        return cls.from_state_dict(unet_state, config or SD_TURBO_UNET_CONFIG, torch_dtype, device,
                                   source=str(weights_path))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        config: dict[str, Any],
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        source: str = "the state dict",
    ) -> DiffDISUNet:
        """Build the architecture on the meta device and assign the weights: strict, no random layer."""
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            with torch.device("meta"):
                model = cls.from_config(config)
        except Exception as error:  # diffusers raises several types for impossible configs
            raise DiffDISError(f"the UNet config for {source} cannot build a UNet ({type(error).__name__}: "
                               f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'}); "
                               "is unet/config.json damaged or from another model?") from None
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise DiffDISError(
                f"{source} is not a DiffDIS UNet for this config: "
                f"{len(missing)} missing tensor(s) {_few(missing)}, {len(unexpected)} unexpected {_few(unexpected)}")
        wrong = [k for k in expected if expected[k].shape != state_dict[k].shape]
        if wrong:
            k = wrong[0]
            raise DiffDISError(
                f"{source}: {len(wrong)} tensor(s) have the wrong shape for this config, e.g. {k} is "
                f"{tuple(state_dict[k].shape)}, the config needs {tuple(expected[k].shape)}; "
                "is unet/config.json the right one for these weights?")
        dtype = torch_dtype or state_dict["conv_in.weight"].dtype
        state = {k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in state_dict.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


def read_unet_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                         memory_format: torch.memory_format | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read a UNet safetensors file; for the single-file repack, also its empty-prompt embedding.

    ``dtype``: floating tensors are cast to it as they are read, one at a time, so loading the released
    float32 file into bfloat16 never holds more than one float32 tensor (see ``read_safetensors``);
    ``memory_format``: the convolutions' layout on the device they will run on (made once, not converted).
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise pickle_refusal(path)
    # Checked whole first (files.safetensors_layout): a truncated or foreign file is one line saying how.
    # The repack's embedding stays in its own precision (the pipeline keeps it in float32).
    state = read_safetensors(path, dtype, keep_dtype=(REPACK_EMBED_KEY,), memory_format=memory_format)
    embed = state.pop(REPACK_EMBED_KEY, None)
    if any(k.startswith(REPACK_UNET_PREFIX) for k in state):
        state = {k[len(REPACK_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(REPACK_UNET_PREFIX)}
    return state, embed


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"
