"""DiffDISPipeline: image -> mask (and edge) in one UNet step, as a diffusers pipeline.

The stages are public so front ends (the ComfyUI nodes) can run them one by one:
``encode_condition`` (image -> multi-scale RGB latents), ``segment`` (one UNet step per view and
noise draw -> mask and edge latents) and ``decode`` (latents -> maps at the input size, with the
authors' ensembling and test-time augmentation). ``__call__`` chains them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .configs import LATENT_SCALE_FACTOR
from .devices import (
    channels_last_on,
    check_compiler,
    memory_format_on,
    pick_dtype,
    reuse_freed_memory,
    vae_dtype,
    vae_force_upcast,
)
from .ensemble import ENSEMBLE_METHODS, ensemble_maps
from .errors import DiffDISError
from .cutout import cutout_rgba
from .files import apply_umask
from .image_io import pil_to_rgb_tensor, resize
from .loading import ModelSources, load_scheduler, load_vae
from .spec import (DEFAULT_BASE, DEFAULT_MODEL, DEFAULT_PROCESSING_RES, EMPTY_EMBED_FILE, TTA_VIEWS,
                   check_processing_res)
from .text import check_embedding_width, save_empty_embedding
from .unet import DiffDISUNet, chunk_feed_forwards, read_unet_state_dict
from .vae_memory import lean_vae

ImageInput = Image.Image | Sequence[Image.Image] | np.ndarray | torch.Tensor
NoiseInput = torch.Tensor | Sequence[torch.Tensor]

PLAIN_VIEW = (False, 1.0)
# Above this processing size the VAE decodes in tiles of this size (diffusers' tiling): memory stays
# that of a 1024² decode.
VAE_TILE_SIZE = 1024

NON_FINITE_HELP = ("the model produced NaN or infinite values: its weights may be damaged (load them again), or "
                   "float16 overflowed (use bf16 or fp32)")


@dataclass
class DiffDISCondition:
    """What the UNet is conditioned on, for a batch of B images."""

    image: torch.Tensor | None  # [B, 3, R, R] in [-1, 1] at the processing size; only TTA needs it
    rgb_latents: list[torch.Tensor]  # VAE latents of the image at full, 1/2, 1/4, 1/8 side: [B, 4, R/8 / 2^k]
    sizes: list[tuple[int, int]]  # each input image's (height, width)

    @property
    def processing_res(self) -> int:
        return int(self.rgb_latents[0].shape[-1]) * 8

    def to(self, device: torch.device | str | None = None) -> DiffDISCondition:
        image = self.image.to(device) if self.image is not None else None
        return DiffDISCondition(image, [r.to(device) for r in self.rgb_latents], list(self.sizes))


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

    def _plain_view(self) -> SegmentationView:
        return next((v for v in self.views if (v.flip, v.scale) == PLAIN_VIEW), self.views[0])

    @property
    def mask_latents(self) -> torch.Tensor:
        """The first draw of the plain view: [B, 4, h, w]."""
        return self._plain_view().mask_latents[0]

    @property
    def edge_latents(self) -> torch.Tensor:
        return self._plain_view().edge_latents[0]


@dataclass
class DiffDISOutput(BaseOutput):
    """``mask`` and ``edge``: one [B, 1, H, W] float tensor in [0, 1] at the inputs' size (or at the
    processing size), whatever the inputs. ``edge`` is None when not decoded."""

    mask: torch.Tensor
    edge: torch.Tensor | None = None


def to_image_batch(image: ImageInput) -> list[torch.Tensor]:
    """Any supported image input -> a list of [3, H, W] tensors (CPU): uint8 where the input is 8-bit
    (no full-size float copy of large photos), else float in [0, 1]."""
    if isinstance(image, Image.Image):
        return [pil_to_rgb_tensor(image)]
    if isinstance(image, (list, tuple)):
        return [item for part in image for item in to_image_batch(part)]
    if isinstance(image, np.ndarray):
        array = image if image.ndim == 4 else image[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise DiffDISError(f"a numpy image must be HWC or BHWC with 1, 3 or 4 channels, got shape {image.shape}")
        if array.dtype == np.uint8:
            array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()
            tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
        else:
            scale = 65535.0 if array.dtype == np.uint16 else 1.0
            tensor = torch.from_numpy(array.astype(np.float32) / scale).permute(0, 3, 1, 2)
        return list(_to_rgb(tensor))
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4) or not (
                tensor.is_floating_point() or tensor.dtype == torch.uint8):
            raise DiffDISError(f"a tensor image must be [B, 3, H, W], float in [0, 1] or uint8, got "
                               f"{tuple(image.shape)} {image.dtype}")
        return list(_to_rgb(tensor if tensor.dtype == torch.uint8 else tensor.float()))
    raise DiffDISError(f"unsupported image input {type(image).__name__}: give PIL images, a uint8 HWC array "
                       "or a [B, 3, H, W] tensor (float in [0, 1] or uint8)")


def _to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    channels = tensor.shape[1]
    return tensor.expand(-1, 3, -1, -1) if channels == 1 else tensor[:, :3]


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


def _reusing_freed_memory(method):
    """Run a stage under ``devices.reuse_freed_memory``: freed CPU memory reused within it, handed back
    to the OS when it ends."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with reuse_freed_memory(self._execution_device):
            return method(self, *args, **kwargs)

    return wrapper


def predict_x0(unet: torch.nn.Module, scheduler: DDPMScheduler, empty_text_embed: torch.Tensor,
               rgb_latents: Sequence[torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
    """The DiffDIS step, for inference and training alike: the UNet's epsilon at t = T - 1 for ``noisy``
    [2B, 4, h, w] (mask items, then edge items) conditioned on the RGB latents (B at each of the 4 scales),
    and x̂0 from it in float32, whatever the UNet's or autocast's dtype."""
    batch = noisy.shape[0] // 2
    device, dtype = noisy.device, noisy.dtype
    t = scheduler.config.num_train_timesteps - 1
    eps = unet(
        torch.cat([rgb_latents[0].repeat(2, 1, 1, 1), noisy], dim=1),
        torch.full((2 * batch,), t, device=device, dtype=torch.long),
        encoder_hidden_states=empty_text_embed.to(device, dtype).expand(2 * batch, -1, -1),
        class_labels=bde_labels(batch, device, dtype),
        rgb_token=[r.repeat(2, 1, 1, 1) for r in rgb_latents],
    ).sample
    alpha = scheduler.alphas_cumprod[t].to(device, torch.float32)
    return (noisy.float() - (1 - alpha).sqrt() * eps.float()) / alpha.sqrt()


def view_side(processing_res: int, scale: float) -> int:
    """A TTA view's side, as ttach scales it (``int(side * scale)``)."""
    return int(processing_res * scale)


class DiffDISPipeline(DiffusionPipeline):
    """One-step DiffDIS segmentation: ``pipe(image).mask``.

    Components: ``unet`` (DiffDISUNet), ``vae`` (AutoencoderKL), ``scheduler`` (for the noise
    schedule), and ``empty_text_embed`` ([1, tokens, dim], the text encoder's output for the unpadded
    empty prompt; the text encoder itself is not kept).
    """

    model_cpu_offload_seq = "unet->vae"  # the VAE runs last (decode): offload the UNet before it

    def __init__(self, unet: DiffDISUNet, vae: AutoencoderKL, scheduler: DDPMScheduler,
                 empty_text_embed: torch.Tensor | None = None):
        super().__init__()
        if empty_text_embed is None or empty_text_embed.ndim != 3:
            raise DiffDISError("DiffDISPipeline needs the empty-prompt embedding, a [1, tokens, dim] tensor")
        self.register_modules(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler)
        lean_vae(self.vae)
        chunk_feed_forwards(self.unet)
        self.empty_text_embed = empty_text_embed.float()
        # One step per image: a progress bar only where someone watches (a terminal), and not left behind.
        self.set_progress_bar_config(disable=None, leave=False)
        # Tiles as large as the 1024² the model was trained at: only larger sizes are decoded in tiles.
        self.vae.tile_sample_min_size = VAE_TILE_SIZE
        self.vae.tile_latent_min_size = VAE_TILE_SIZE // 8
        self.set_channels_last(channels_last_on(self.unet.device))

    # ------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype (the VAE may be float32 under a float16 UNet)."""
        return self.unet.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def tta_views(self) -> list[tuple[bool, float]]:
        """The test-time-augmentation views as (horizontal flip, scale), in the authors' (ttach) order."""
        return list(TTA_VIEWS)

    def to(self, *args: Any, **kwargs: Any) -> DiffDISPipeline:
        """Move and/or cast, like ``DiffusionPipeline.to`` (``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``,
        ``pipe.to("cuda", torch.float16)``). In float16 the VAE stays float32 when its config asks to
        (``force_upcast``: the SD VAE overflows in float16); bfloat16 needs no upcast."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        dtype = dtype or self.dtype
        # nn.Module.to: casting through DiffusionPipeline.to would round the VAE through float16.
        torch.nn.Module.to(self.unet, device=device, dtype=dtype)
        torch.nn.Module.to(self.vae, device=device,
                           dtype=vae_dtype(dtype, vae_force_upcast(self.vae.config)))
        if device is not None:
            self.set_channels_last(channels_last_on(device))
        return self

    def set_channels_last(self, enabled: bool) -> None:
        """Channels-last convolutions or not (``devices.channels_last_on`` says which for a device).
        ``to()`` and the loaders choose for the device; front ends that move the modules themselves
        (ComfyUI) call this for their load device."""
        memory_format = torch.channels_last if enabled else torch.contiguous_format
        torch.nn.Module.to(self.unet, memory_format=memory_format)
        torch.nn.Module.to(self.vae, memory_format=memory_format)

    def compile(self, **compile_kwargs: Any) -> DiffDISPipeline:
        """``torch.compile`` the UNet and the VAE (in place; the first call of each shape compiles)."""
        self.unet.compile(**compile_kwargs)
        self.vae.encoder.compile(**compile_kwargs)
        self.vae.decoder.compile(**compile_kwargs)
        return self

    @property
    def latent_scale(self) -> float:
        return self.vae.config.get("scaling_factor") or LATENT_SCALE_FACTOR

    # ------------------------------------------------------------------ stages
    @torch.inference_mode()
    @_reusing_freed_memory
    def encode_condition(self, image: ImageInput, processing_res: int = DEFAULT_PROCESSING_RES,
                         keep_image: bool = True) -> DiffDISCondition:
        """Resize each image to ``processing_res``² and VAE-encode it at full, 1/2, 1/4 and 1/8 size.

        ``keep_image=False`` drops the processing-size image from the condition (test-time
        augmentation then cannot run on it). Like every stage it trusts its inputs: ``check_inputs``
        checks them.
        """
        images = to_image_batch(image)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        square = (processing_res, processing_res)
        rgb = torch.cat([_to_unit_float(resize(x[None], square)) for x in images]).clamp(0, 1)
        device = self._execution_device
        rgb = (rgb * 2 - 1).to(device, self.vae_dtype)
        return DiffDISCondition(rgb if keep_image else None, self.rgb_latents(rgb), sizes)

    def rgb_latents(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The condition: VAE latents of ``rgb`` ([B, 3, R, R] in [-1, 1]) at full, 1/2, 1/4 and 1/8 side.

        Not in inference mode, so training can use it too (under ``torch.no_grad`` for a frozen VAE).
        """
        side = rgb.shape[-1]
        latents = [self.encode_latent(rgb)]
        for factor in (2, 4, 8):
            # As the authors: plain bilinear (no antialias) to side // factor.
            small = F.interpolate(rgb, size=(side // factor,) * 2, mode="bilinear", align_corners=False)
            latents.append(self.encode_latent(small))
        return latents

    def encode_latent(self, rgb: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled posterior mean (no sampling), in the UNet's dtype."""
        mean = self.vae.encode(rgb.to(self.vae_dtype)).latent_dist.mean
        return (mean * self.latent_scale).to(self.dtype)

    @torch.inference_mode()
    @_reusing_freed_memory
    def segment(self, condition: DiffDISCondition, latents: NoiseInput | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                ensemble_size: int = 1, tta: bool = False,
                callback: Callable[[], None] | None = None) -> DiffDISLatents:
        """One UNet step for mask and edge together (a batch of 2B), per view and noise draw.

        Views: the plain one, or with ``tta`` the six of ``tta_views``. ``latents``: the initial noise,
        either one tensor (the first view's first draw; the rest come from ``generator``) or a list of
        one [B, 4, h_v, w_v] tensor per view and draw (views in ``tta_views`` order, draws inner), which
        replays a run exactly. The same noise seeds mask and edge. ``callback`` runs after each UNet call.
        """
        processing_res = condition.processing_res
        if tta and condition.image is None:
            raise DiffDISError("test-time augmentation needs the condition's image: encode it with keep_image=True")
        views = self.tta_views if tta else [PLAIN_VIEW]
        noises = self._check_noises(latents, views, ensemble_size, processing_res, len(condition.sizes))
        device = self._execution_device
        condition = condition.to(device)  # a no-op unless a front end kept it elsewhere
        results = []
        with self.progress_bar(total=len(views) * ensemble_size) as progress:
            for flip, scale in views:
                if (flip, scale) == PLAIN_VIEW:
                    rgb_latents = condition.rgb_latents
                else:
                    rgb_latents = self.rgb_latents(self._augment(condition.image, flip, scale))
                shape = tuple(rgb_latents[0].shape)
                masks, edges = [], []
                for _ in range(ensemble_size):
                    noise = noises.pop(0) if noises else None
                    if noise is None:
                        noise = randn_tensor(shape, generator=generator, device=device, dtype=self.dtype)
                    mask, edge = self.one_step(rgb_latents, noise.to(device, self.dtype))
                    masks.append(mask)
                    edges.append(edge)
                    progress.update()
                    if callback is not None:
                        callback()
                results.append(SegmentationView(torch.stack(masks), torch.stack(edges), flip, scale))
        return DiffDISLatents(results, list(condition.sizes), processing_res)

    def _check_noises(self, latents: NoiseInput | None, views: list[tuple[bool, float]], ensemble_size: int,
                      processing_res: int, batch: int) -> list[torch.Tensor | None]:
        """The given initial noises per (view, draw) in run order, checked against their shapes."""
        if latents is None:
            return []
        given = [latents] if isinstance(latents, torch.Tensor) else list(latents)
        expected = [(batch, 4, view_side(processing_res, scale) // 8, view_side(processing_res, scale) // 8)
                    for _, scale in views for _ in range(ensemble_size)]
        if not isinstance(latents, torch.Tensor) and len(given) != len(expected):
            raise DiffDISError(f"latents: give one noise per view and draw ({len(views)} view(s) x {ensemble_size} "
                               f"draw(s) = {len(expected)}), got {len(given)}")
        for index, (noise, shape) in enumerate(zip(given, expected)):
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                got = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise DiffDISError(f"latents[{index}] must have shape {list(shape)} for this input, got {got}")
        return given

    @staticmethod
    def _augment(image: torch.Tensor, flip: bool, scale: float) -> torch.Tensor:
        """A TTA view of the [-1, 1] image, as ttach makes it: flip, then plain bilinear to the view's side."""
        if flip:
            image = image.flip(-1)
        if scale != 1.0:
            side = view_side(image.shape[-1], scale)
            image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
        return image

    def one_step(self, rgb_latents: Sequence[torch.Tensor], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_T (= noise) -> x̂0 for the mask and edge streams, from one UNet call at t = T - 1."""
        batch = noise.shape[0]
        x0 = predict_x0(self.unet, self.scheduler, self.empty_text_embed, rgb_latents, noise.repeat(2, 1, 1, 1))
        if not torch.isfinite(x0).all():
            raise DiffDISError(NON_FINITE_HELP)
        return x0[:batch].to(self.dtype), x0[batch:].to(self.dtype)

    @torch.inference_mode()
    def decode_maps(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """x̂0 latents [N, 4, h, w] -> maps [N, 1, 8h, 8w] in [0, 1] (channel mean, clipped), decoding at
        most ``batch_size`` latents at once (all by default); above 1024² in tiles."""
        device = self._execution_device
        user_tiling = self.vae.use_tiling
        self.vae.use_tiling = user_tiling or max(latents.shape[-2:]) > self.vae.tile_latent_min_size
        maps = []
        try:
            for chunk in latents.split(batch_size or latents.shape[0]):
                decoded = self.vae.decode(chunk.to(device, self.vae_dtype) / self.latent_scale).sample
                maps.append((decoded.float().mean(dim=1, keepdim=True).clamp(-1, 1) + 1) / 2)
        finally:
            self.vae.use_tiling = user_tiling
        maps = torch.cat(maps)
        if not torch.isfinite(maps).all():
            raise DiffDISError(NON_FINITE_HELP)
        return maps

    @torch.inference_mode()
    @_reusing_freed_memory
    def decode(self, latents: DiffDISLatents, decode_edge: bool = True, minmax: bool = True,
               output_size: bool = True, ensemble_reduction: str = "median",
               batch_size: int | None = None) -> DiffDISOutput:
        """Maps from latents, as the authors make them: per view, combine the draws (``ensemble_reduction``:
        ``median`` = their scale-and-shift-aligned median, or ``mean``), min-max (``minmax``), undo the
        view's flip and scale (plain bilinear), average the views; then resize to the inputs' size
        (``output_size``: they must have one size; else the maps stay at the processing size).

        ``batch_size``: latents decoded at once (default: the batch's masks, then its edges, per draw and
        view), so the edge, ensembling and TTA add no memory to a mask-only run.
        """
        square = (latents.processing_res, latents.processing_res)
        kinds = ["mask", "edge"] if decode_edge else ["mask"]
        sums: dict[str, torch.Tensor] = {}
        for view in latents.views:
            draws, batch = view.mask_latents.shape[:2]
            per_draw = torch.stack([getattr(view, f"{kind}_latents") for kind in kinds], dim=1)  # [D, K, B, 4, h, w]
            maps = self.decode_maps(per_draw.flatten(0, 2), batch_size or batch)
            maps = maps.view(draws, len(kinds), batch, *maps.shape[1:])
            for index, kind in enumerate(kinds):
                combined = torch.stack([ensemble_maps(maps[:, index, b], ensemble_reduction)
                                        for b in range(batch)])
                combined = minmax_normalize(combined) if minmax else combined
                if view.flip:
                    combined = combined.flip(-1)
                if tuple(combined.shape[-2:]) != square:
                    combined = F.interpolate(combined, size=square, mode="bilinear", align_corners=False)
                sums[kind] = combined if kind not in sums else sums[kind] + combined
        count = len(latents.views)
        maps = {kind: total / count for kind, total in sums.items()}
        if output_size:
            maps = {kind: resize(m, _one_size(latents.sizes)).clamp(0, 1) for kind, m in maps.items()}
        return DiffDISOutput(mask=maps["mask"], edge=maps.get("edge"))

    def check_inputs(self, images: list[torch.Tensor], processing_res: int, ensemble_size: int,
                     ensemble_reduction: str, tta: bool, output_size: bool) -> None:
        """Every setting of ``__call__``, checked once at its entry (diffusers' ``check_inputs``): the
        stages trust them. Each problem is one DiffDISError naming the value and what to do."""
        check_processing_res(processing_res, tta=tta)
        if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
            raise DiffDISError(f"ensemble_size must be a positive integer, got {ensemble_size!r}")
        if ensemble_reduction not in ENSEMBLE_METHODS:
            raise DiffDISError(f"ensemble_reduction must be one of {', '.join(ENSEMBLE_METHODS)}, "
                               f"got {ensemble_reduction!r}")
        if not images:
            raise DiffDISError("no image given")
        if output_size:
            _one_size([tuple(x.shape[-2:]) for x in images])

    @torch.inference_mode()
    @_reusing_freed_memory
    def __call__(self, image: ImageInput, processing_res: int = DEFAULT_PROCESSING_RES,
                 latents: NoiseInput | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, ensemble_size: int = 1,
                 ensemble_reduction: str = "median", tta: bool = False, decode_edge: bool = True, minmax: bool = True,
                 output_size: bool = True, refine_edges: bool = False,
                 callback: Callable[[], None] | None = None) -> DiffDISOutput:
        """Segment ``image``: PIL image(s), a uint8 HWC array, or a [B, 3, H, W] tensor (float in [0, 1]
        or uint8).

        ``processing_res``: the square size the model sees (a multiple of 64; with ``tta`` of 256).
        ``ensemble_size`` noise draws per view are combined by ``ensemble_reduction`` (``median``: the
        authors' aligned median; ``mean``). ``tta``: the authors' six flip x scale views. ``latents``:
        see ``segment``. ``minmax``: the authors' per-map min-max normalisation. Returns one
        [B, 1, H, W] tensor per map: the inputs must have one size, or ``output_size=False`` keeps the
        maps at the processing size. ``refine_edges``: masks of inputs larger than the processing size
        follow the image's edges at full size (the cutout's step, ``diffdis_core.cutout_rgba``) instead
        of being enlarged bilinearly (off by default: the authors' maps).
        """
        images = to_image_batch(image)
        self.check_inputs(images, processing_res, ensemble_size, ensemble_reduction, tta, output_size)
        condition = self.encode_condition(images, processing_res, keep_image=tta)
        segmented = self.segment(condition, latents=latents, generator=generator, ensemble_size=ensemble_size,
                                 tta=tta, callback=callback)
        refine = refine_edges and output_size
        output = self.decode(segmented, decode_edge=decode_edge, minmax=minmax, output_size=output_size and not refine,
                             ensemble_reduction=ensemble_reduction)
        if refine:
            # One image at a time: a full-size float copy of one photo at most.
            mask = torch.cat([cutout_rgba(x[None].to(m.device), m[None], refine_edges=True, refine_foreground=False)[1]
                              for x, m in zip(images, output.mask, strict=True)])
            edge = resize(output.edge, _one_size(segmented.sizes)).clamp(0, 1) if output.edge is not None else None
            output = DiffDISOutput(mask=mask, edge=edge)
        self.maybe_free_model_hooks()
        return output

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        base: str | os.PathLike | None = DEFAULT_BASE,
        torch_dtype: torch.dtype | str = torch.float32,
        device: str | torch.device | None = None,
        local_dir: str | os.PathLike | None = None,
        cache_embedding: bool = True,
        compile: bool = False,
        **hub_kwargs: Any,
    ) -> DiffDISPipeline:
        """Load a DiffDIS model in any of the forms users have.

        ``model``: a model folder (unet/, vae/, scheduler/, empty_text_embed.safetensors or
        text_encoder/ + tokenizer/; also what ``save_pretrained`` writes), the authors' Google-Drive
        ``unet/`` folder, a single UNet ``.safetensors`` file (also the fp16 repack with its embedding),
        or a Hugging Face repo id. ``base``: an SD-Turbo folder or repo id for whatever ``model`` lacks
        (VAE, scheduler, text encoder); it is only read or downloaded when needed. ``torch_dtype``: a
        dtype, or ``"auto"``: the fastest precision that is safe on ``device`` (see
        ``diffdis_core.devices.auto_dtype``). ``local_dir``: download here instead of the Hugging Face
        cache. ``compile``: ``torch.compile`` the UNet and VAE. ``hub_kwargs``: ``cache_dir``,
        ``local_files_only``, ``revision``, ``token``.
        """
        target = torch.device(device) if device is not None else torch.device("cpu")
        dtype = pick_dtype(torch_dtype, target)
        if compile:
            check_compiler(target)
        sources = ModelSources.resolve(model, base, local_dir=local_dir, **hub_kwargs)
        unet_state, repack_embed = read_unet_state_dict(sources.unet_weights, dtype, memory_format_on(target))
        unet = DiffDISUNet.from_state_dict(unet_state, sources.unet_config(), dtype, device,
                                           source=str(sources.unet_weights))
        del unet_state
        vae = load_vae(sources.component("vae"), dtype, memory_format_on(target))
        scheduler = load_scheduler(sources.component("scheduler", required=False))
        if repack_embed is not None:  # a single-file repack's own embedding: it must fit this UNet too
            embed = check_embedding_width(repack_embed, unet.config.cross_attention_dim, sources.unet_weights)
        else:
            embed = sources.empty_embedding(cache_embedding)
        pipe = cls(unet, vae, scheduler, embed).to(device, dtype)
        return pipe.compile() if compile else pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:  # type: ignore[override]
        """Write a complete model folder: model_index.json, unet/, vae/, scheduler/ and
        empty_text_embed.safetensors (so the text encoder is never needed to load it)."""
        directory = Path(save_directory)
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(directory, **kwargs)
        apply_umask(directory)  # safetensors writes 0600: a folder saved by one account loads under another
        save_empty_embedding(self.empty_text_embed, directory / EMPTY_EMBED_FILE)
        return directory


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255 if x.dtype == torch.uint8 else x


def _one_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The inputs' one (height, width): the maps at the input size are one [B, 1, H, W] tensor."""
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in dict.fromkeys(sizes))
        raise DiffDISError(f"the images differ in size ({shown}): segment each size in its own call, or pass "
                           "output_size=False for maps at the processing size")
    return sizes[0]


__all__ = [
    "DiffDISCondition", "DiffDISLatents", "DiffDISOutput", "DiffDISPipeline", "SegmentationView",
    "bde_labels", "minmax_normalize", "predict_x0", "to_image_batch",
]
