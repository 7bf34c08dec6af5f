"""DiffDISPipeline: image -> mask (and edge) in one UNet step.

The stages are public so front ends (the ComfyUI nodes) can run them one by one:
``encode_condition`` (image -> multi-scale RGB latents), ``segment`` (one UNet step -> mask and edge
latents) and ``decode`` (latents -> maps at the input size). ``__call__`` chains them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .configs import LATENT_SCALE_FACTOR, SD_TURBO_SCHEDULER_CONFIG
from .errors import DiffDISError
from .hub import DEFAULT_BASE, DEFAULT_MODEL, EMPTY_EMBED_FILE
from .loading import ModelSources
from .text import save_empty_embedding
from .unet import DiffDISUNet, read_unet_state_dict

ImageInput = Image.Image | Sequence[Image.Image] | np.ndarray | torch.Tensor

# The authors' test-time augmentation: horizontal flip x scales 0.75 / 1 / 1.25 (six views).
TTA_VIEWS = [(False, 1.0), (True, 1.0), (False, 0.75), (True, 0.75), (False, 1.25), (True, 1.25)]


@dataclass
class DiffDISCondition:
    """What the UNet is conditioned on, for a batch of B images."""

    image: torch.Tensor  # [B, 3, R, R] in [-1, 1] at the processing resolution (kept for TTA views)
    rgb_latents: list[torch.Tensor]  # VAE latents of the image at full, 1/2, 1/4, 1/8 side: [B, 4, R/8 / 2^k]
    sizes: list[tuple[int, int]]  # each input image's (height, width)

    def to(self, device: torch.device | str | None = None) -> DiffDISCondition:
        return DiffDISCondition(self.image.to(device), [r.to(device) for r in self.rgb_latents], list(self.sizes))


@dataclass
class SegmentationView:
    """One augmented view's one-step predictions: ``[draws, B, 4, h, w]`` latents for mask and edge."""

    mask_latents: torch.Tensor
    edge_latents: torch.Tensor
    flip: bool = False
    scale: float = 1.0


@dataclass
class DiffDISLatents:
    """The one-step x0 predictions of a batch, per view (one view unless TTA is on)."""

    views: list[SegmentationView]
    sizes: list[tuple[int, int]]
    processing_res: int

    @property
    def mask_latents(self) -> torch.Tensor:
        """The first draw of the plain view: [B, 4, h, w]."""
        return self.views[0].mask_latents[0]

    @property
    def edge_latents(self) -> torch.Tensor:
        return self.views[0].edge_latents[0]


@dataclass
class DiffDISOutput(BaseOutput):
    """``mask`` and ``edge``: [B, 1, H, W] float in [0, 1] at the input size (a list of [1, 1, H_i, W_i]
    tensors when the inputs differ in size); ``edge`` is None when not decoded."""

    mask: torch.Tensor | list[torch.Tensor]
    edge: torch.Tensor | list[torch.Tensor] | None = None


def to_image_batch(image: ImageInput) -> list[torch.Tensor]:
    """Any supported image input -> a list of float [3, H, W] tensors in [0, 1] (CPU)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        out = []
        for item in image:
            if isinstance(item, Image.Image):
                out.append(torch.from_numpy(np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1))
            else:
                out.extend(to_image_batch(item))
        return out
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 4 else image[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise DiffDISError(f"a numpy image must be HWC or BHWC with 1, 3 or 4 channels, got shape {image.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 65535.0 if array.dtype == np.uint16 else 1.0
        tensor = torch.from_numpy(array.astype(np.float32) / scale).permute(0, 3, 1, 2)
        return list(_to_rgb(tensor))
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4) or not tensor.is_floating_point():
            raise DiffDISError(f"a tensor image must be float [B, 3, H, W] in [0, 1], got {tuple(image.shape)} "
                               f"{image.dtype}")
        return list(_to_rgb(tensor.float()))
    raise DiffDISError(f"unsupported image input {type(image).__name__}: give PIL images, a uint8 HWC array "
                       "or a float [B, 3, H, W] tensor in [0, 1]")


def _to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    channels = tensor.shape[1]
    return tensor.expand(-1, 3, -1, -1) if channels == 1 else tensor[:, :3]


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize; antialiased when shrinking (like PIL), a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """The authors' per-map min-max normalisation to [0, 1] (a constant map becomes 0)."""
    flat = x.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (x.ndim - 1))
    high = flat.max(dim=1).values.view(-1, *[1] * (x.ndim - 1))
    return (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)


def bde_labels(batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Batch-discriminative embedding inputs: [sin 0, sin 1, cos 0, cos 1] for mask items, swapped for edge."""
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=device, dtype=torch.float32)
    return torch.cat([labels.sin(), labels.cos()], dim=-1).repeat_interleave(batch, 0).to(dtype)


class DiffDISPipeline:
    """One-step DiffDIS segmentation: ``pipe(image).mask``.

    Components: ``unet`` (DiffDISUNet), ``vae`` (AutoencoderKL), ``scheduler`` (for the noise
    schedule) and ``empty_text_embed`` ([1, tokens, dim], the text encoder's output for the unpadded
    empty prompt; the text encoder itself is not kept).
    """

    def __init__(self, unet: DiffDISUNet, vae: AutoencoderKL, scheduler: DDPMScheduler,
                 empty_text_embed: torch.Tensor):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.scheduler = scheduler
        self.empty_text_embed = empty_text_embed.to(unet.device, unet.dtype)
        self.progress_bar: Callable[..., Any] | None = None
        self._set_memory_format()

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffDISPipeline:
        """Move (and cast) the pipeline. In float16 the VAE stays float32 when its config asks to
        (``force_upcast``: the SD VAE overflows in float16)."""
        dtype = dtype or self.dtype
        vae_dtype = torch.float32 if dtype == torch.float16 and self.vae.config.get("force_upcast") else dtype
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules these models do not have.
        torch.nn.Module.to(self.unet, device=device, dtype=dtype)
        torch.nn.Module.to(self.vae, device=device, dtype=vae_dtype)
        self.empty_text_embed = self.empty_text_embed.to(device=device, dtype=dtype)
        self._set_memory_format()
        return self

    def _set_memory_format(self) -> None:
        # Channels-last convolutions are faster on CPU (oneDNN) and CUDA (tensor cores) with identical
        # results, and spare the transformer blocks a layout copy; MPS support for them is patchy.
        memory_format = torch.channels_last if self.device.type in ("cpu", "cuda") else torch.contiguous_format
        torch.nn.Module.to(self.unet, memory_format=memory_format)
        torch.nn.Module.to(self.vae, memory_format=memory_format)

    @property
    def latent_scale(self) -> float:
        return self.vae.config.get("scaling_factor") or LATENT_SCALE_FACTOR

    # ------------------------------------------------------------------ stages
    @torch.inference_mode()
    def encode_condition(self, image: ImageInput, processing_res: int = 1024) -> DiffDISCondition:
        """Resize each image to ``processing_res``² and VAE-encode it at full, 1/2, 1/4 and 1/8 size."""
        if not isinstance(processing_res, int) or processing_res < 8 or processing_res % 8:
            raise DiffDISError(f"processing_res must be a positive multiple of 8, got {processing_res!r}")
        images = to_image_batch(image)
        if not images:
            raise DiffDISError("no image given")
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        square = (processing_res, processing_res)
        rgb = torch.cat([resize(x[None], square) for x in images]).clamp(0, 1)
        rgb = (rgb * 2 - 1).to(self.device, self.vae_dtype)
        return DiffDISCondition(rgb, self.rgb_latents(rgb), sizes)

    def rgb_latents(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The condition: VAE latents of ``rgb`` ([B, 3, R, R] in [-1, 1]) at full, 1/2, 1/4 and 1/8 side.

        Not in inference mode, so training can use it too (under ``torch.no_grad`` for a frozen VAE).
        """
        side = rgb.shape[-1]
        latents = [self.encode_latent(rgb)]
        for factor in (2, 4, 8):
            # As the authors: plain bilinear (no antialias) to side // factor.
            small = F.interpolate(rgb, size=(max(side // factor, 8),) * 2, mode="bilinear", align_corners=False)
            latents.append(self.encode_latent(small))
        return latents

    def encode_latent(self, rgb: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled posterior mean (no sampling), in the UNet's dtype."""
        mean = self.vae.encode(rgb.to(self.vae_dtype)).latent_dist.mean
        return (mean * self.latent_scale).to(self.dtype)

    @torch.inference_mode()
    def segment(self, condition: DiffDISCondition, latents: torch.Tensor | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                ensemble_size: int = 1, tta: bool = False) -> DiffDISLatents:
        """One UNet step for mask and edge together (a batch of 2B), per view and noise draw.

        ``latents``: the initial noise [B, 4, h, w] of the plain view's first draw (the same noise
        seeds mask and edge); other draws come from ``generator``.
        """
        if not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise DiffDISError(f"ensemble_size must be a positive integer, got {ensemble_size!r}")
        condition = condition.to(self.device)  # a no-op unless a front end kept it elsewhere
        views = []
        for flip, scale in (TTA_VIEWS if tta else TTA_VIEWS[:1]):
            rgb_latents = condition.rgb_latents if (flip, scale) == (False, 1.0) else \
                self.rgb_latents(self._augment(condition.image, flip, scale))
            masks, edges = [], []
            for draw in range(ensemble_size):
                shape = tuple(rgb_latents[0].shape)
                if latents is not None and not views and draw == 0:
                    if tuple(latents.shape) != shape:
                        raise DiffDISError(f"latents must have shape {list(shape)} for this input, "
                                           f"got {list(latents.shape)}")
                    noise = latents.to(self.device, self.dtype)
                else:
                    noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
                mask, edge = self.one_step(rgb_latents, noise)
                masks.append(mask)
                edges.append(edge)
                if self.progress_bar is not None:
                    self.progress_bar()
            views.append(SegmentationView(torch.stack(masks), torch.stack(edges), flip, scale))
        return DiffDISLatents(views, list(condition.sizes), int(condition.image.shape[-1]))

    @staticmethod
    def _augment(image: torch.Tensor, flip: bool, scale: float) -> torch.Tensor:
        if flip:
            image = image.flip(-1)
        if scale != 1.0:
            image = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        return image

    def one_step(self, rgb_latents: Sequence[torch.Tensor], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (= noise) -> x̂0 for the mask and edge streams, from one UNet call at t = T - 1."""
        batch = noise.shape[0]
        t = self.scheduler.config.num_train_timesteps - 1
        noisy = noise.repeat(2, 1, 1, 1)
        eps = self.unet(
            torch.cat([rgb_latents[0].repeat(2, 1, 1, 1), noisy], dim=1),
            torch.full((2 * batch,), t, device=self.device, dtype=torch.long),
            encoder_hidden_states=self.empty_text_embed.expand(2 * batch, -1, -1),
            class_labels=bde_labels(batch, self.device, self.dtype),
            rgb_token=[r.repeat(2, 1, 1, 1) for r in rgb_latents],
        ).sample
        alpha = self.scheduler.alphas_cumprod[t].to(self.device, torch.float32)
        x0 = (noisy.float() - (1 - alpha).sqrt() * eps.float()) / alpha.sqrt()
        return x0[:batch].to(self.dtype), x0[batch:].to(self.dtype)

    @torch.inference_mode()
    def decode_maps(self, latents: torch.Tensor) -> torch.Tensor:
        """x̂0 latents [N, 4, h, w] -> maps [N, 1, 8h, 8w] in [0, 1] (channel mean, clipped)."""
        z = self.vae.post_quant_conv(latents.to(self.device, self.vae_dtype) / self.latent_scale)
        decoded = self.vae.decoder(z).float().mean(dim=1, keepdim=True)
        return (decoded.clamp(-1, 1) + 1) / 2

    @torch.inference_mode()
    def decode(self, latents: DiffDISLatents, decode_edge: bool = True, minmax: bool = True,
               output_size: bool = True) -> DiffDISOutput:
        """Decode each view, average its draws, min-max it (``minmax``), undo the view's flip and
        scale, average the views, and resize to each input's size (``output_size``)."""
        square = (latents.processing_res, latents.processing_res)
        mask_sum = edge_sum = None
        for view in latents.views:
            draws, batch = view.mask_latents.shape[:2]
            parts = [view.mask_latents.flatten(0, 1)] + ([view.edge_latents.flatten(0, 1)] if decode_edge else [])
            maps = self.decode_maps(torch.cat(parts))
            maps = maps.view(len(parts), draws, batch, *maps.shape[1:]).mean(dim=1)  # [parts, B, 1, h, w]
            maps = [minmax_normalize(m) if minmax else m for m in maps]
            maps = [resize(m.flip(-1) if view.flip else m, square) for m in maps]
            mask_sum = maps[0] if mask_sum is None else mask_sum + maps[0]
            if decode_edge:
                edge_sum = maps[1] if edge_sum is None else edge_sum + maps[1]
        count = len(latents.views)
        mask = self._to_input_sizes(mask_sum / count, latents.sizes, output_size)
        edge = self._to_input_sizes(edge_sum / count, latents.sizes, output_size) if decode_edge else None
        return DiffDISOutput(mask=mask, edge=edge)

    @staticmethod
    def _to_input_sizes(maps: torch.Tensor, sizes: list[tuple[int, int]], output_size: bool):
        if not output_size:
            return maps
        if len(set(sizes)) == 1:
            return resize(maps, sizes[0]).clamp(0, 1)
        return [resize(m[None], size).clamp(0, 1) for m, size in zip(maps, sizes, strict=True)]

    @torch.inference_mode()
    def __call__(self, image: ImageInput, processing_res: int = 1024, latents: torch.Tensor | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, ensemble_size: int = 1,
                 tta: bool = False, decode_edge: bool = True, minmax: bool = True) -> DiffDISOutput:
        """Segment ``image``: PIL image(s), a uint8 HWC array, or a float [B, 3, H, W] tensor in [0, 1]."""
        condition = self.encode_condition(image, processing_res)
        segmented = self.segment(condition, latents=latents, generator=generator,
                                 ensemble_size=ensemble_size, tta=tta)
        return self.decode(segmented, decode_edge=decode_edge, minmax=minmax)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        base: str | os.PathLike | None = DEFAULT_BASE,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        local_dir: str | os.PathLike | None = None,
        cache_embedding: bool = True,
        **hub_kwargs: Any,
    ) -> DiffDISPipeline:
        """Load a DiffDIS model in any of the forms users have.

        ``model``: a model folder (unet/, vae/, scheduler/, empty_text_embed.safetensors or
        text_encoder/ + tokenizer/), the authors' Google-Drive ``unet/`` folder, a single UNet
        ``.safetensors`` file (also the fp16 repack with its embedding), or a Hugging Face repo id.
        ``base``: an SD-Turbo folder or repo id for whatever ``model`` lacks (VAE, scheduler, text
        encoder); it is only read or downloaded when needed. ``local_dir``: download here instead of
        the Hugging Face cache. ``hub_kwargs``: ``cache_dir``, ``local_files_only``, ``revision``, ``token``.
        """
        sources = ModelSources.resolve(model, base, local_dir=local_dir, **hub_kwargs)
        unet_state, repack_embed = read_unet_state_dict(sources.unet_weights)
        unet = DiffDISUNet.from_state_dict(unet_state, sources.unet_config(), torch_dtype, device,
                                           source=str(sources.unet_weights))
        del unet_state
        vae_dir = sources.component("vae")
        try:
            vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise DiffDISError(f"could not load the VAE from {vae_dir} ({str(error).splitlines()[0]}); it needs "
                               "config.json and diffusion_pytorch_model.safetensors") from None
        scheduler_dir = sources.component("scheduler", required=False)
        # Only the noise schedule is used; SD-Turbo's is built in for folders without scheduler/.
        scheduler = DDPMScheduler.from_config(
            DDPMScheduler.load_config(scheduler_dir) if scheduler_dir is not None else SD_TURBO_SCHEDULER_CONFIG)
        embed = repack_embed if repack_embed is not None else sources.empty_embedding(cache_embedding)
        pipe = cls(unet, vae, scheduler, embed)
        return pipe.to(device, torch_dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write a complete model folder (unet/, vae/, scheduler/, empty_text_embed.safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        self.scheduler.save_pretrained(directory / "scheduler")
        save_empty_embedding(self.empty_text_embed, directory / EMPTY_EMBED_FILE)
        return directory


__all__ = [
    "DiffDISCondition", "DiffDISLatents", "DiffDISOutput", "DiffDISPipeline", "SegmentationView",
    "bde_labels", "minmax_normalize", "to_image_batch",
]
