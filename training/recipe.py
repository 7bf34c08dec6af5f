"""The DiffDIS training step: pyramid noise at t = T - 1, one-step x0, MSE on the mask and edge latents.

The batch through the UNet is ``[mask items; edge items]`` (2B), as at inference, so the DBIA block's
mutual attention and the batch-discriminative embedding see the same arrangement they do there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffdis_core import DiffDISPipeline
from diffdis_core.pipeline import predict_x0


def pyramid_noise_like(x: torch.Tensor, discount: float = 0.8, generator: torch.Generator | None = None,
                       levels: int = 10) -> torch.Tensor:
    """The authors' multi-resolution ("pyramid") noise: Gaussian noise plus bilinearly up-sampled
    lower-resolution Gaussians weighted by ``discount**i`` (each level shrinks the previous one by a random
    factor in [2, 4)^i), renormalised to unit standard deviation over the whole batch.

    Drawn on the CPU from ``generator`` (reproducible on any device), returned on ``x``'s device and dtype.
    """
    batch, channels, height, width = x.shape
    noise = torch.randn(x.shape, generator=generator)
    h, w = height, width
    for level in range(levels):
        ratio = 2 + 2 * float(torch.rand((), generator=generator))
        h, w = max(1, int(h / ratio ** level)), max(1, int(w / ratio ** level))
        coarse = torch.randn(batch, channels, h, w, generator=generator)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount ** level
        if h == 1 or w == 1:
            break
    return (noise / noise.std()).to(x.device, x.dtype)


def gaussian_noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


@torch.no_grad()
def encode_batch(pipe: DiffDISPipeline, image: torch.Tensor, mask: torch.Tensor, edge: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Frozen-VAE latents: the RGB condition (4 scales) and the clean targets ``[mask; edge]`` [2B, 4, h, w].

    ``image`` [B, 3, R, R], ``mask`` and ``edge`` [B, 1, R, R], all in [-1, 1]; mask and edge are repeated
    to 3 channels, as the authors did, and encoded with the posterior mean.
    """
    # The pipeline's own helper: encode_condition runs in inference mode, whose tensors cannot enter autograd.
    rgb_latents = pipe.rgb_latents(image)
    targets = [pipe.encode_latent(x.repeat(1, 3, 1, 1)) for x in (mask, edge)]  # one B-batch at a time: less memory
    return rgb_latents, torch.cat(targets)


@dataclass
class StepLosses:
    total: torch.Tensor
    mask: torch.Tensor
    edge: torch.Tensor


def one_step_losses(unet: torch.nn.Module, scheduler: DDPMScheduler, empty_text_embed: torch.Tensor,
                    rgb_latents: list[torch.Tensor], target: torch.Tensor, noise: torch.Tensor,
                    edge_weight: float = 1.0) -> StepLosses:
    """Noise the targets to t = T - 1 (q(x_t | x_0)), predict epsilon, step to x̂0 in one go, and take the MSE
    against the clean latents: mask + ``edge_weight`` × edge (the paper: equal weights)."""
    batch = target.shape[0] // 2
    timesteps = torch.full((2 * batch,), scheduler.config.num_train_timesteps - 1, device=target.device,
                           dtype=torch.long)
    x0 = predict_x0(unet, scheduler, empty_text_embed, rgb_latents, scheduler.add_noise(target, noise, timesteps))
    mask_loss = F.mse_loss(x0[:batch], target[:batch].float())
    edge_loss = F.mse_loss(x0[batch:], target[batch:].float())
    return StepLosses(mask_loss + edge_weight * edge_loss, mask_loss, edge_loss)


def optimizer_param_groups(unet: torch.nn.Module, lr: float, bde_lr_scale: float = 10.0) -> list[dict]:
    """Adam groups: everything at ``lr``, the BDE projection (``class_embedding``) at ``bde_lr_scale`` × lr."""
    base, bde = [], []
    for name, param in unet.named_parameters():
        if param.requires_grad:
            (bde if name.startswith("class_embedding.") else base).append(param)
    return [{"params": base, "lr": lr, "name": "unet"}, {"params": bde, "lr": lr * bde_lr_scale, "name": "bde"}]


def lr_multiplier(epoch: int, decay: float = 0.95, every: int = 30, compound: bool = False) -> float:
    """The learning-rate factor during (0-based) ``epoch``.

    ``compound=False``: decay^(epoch // every) — the paper's "×0.95 every 30 epochs".
    ``compound=True``: the authors' code, which after each epoch e (1-based) multiplies the current lr by
    decay^(e // every), so the decay compounds every epoch once e >= every.
    """
    if not compound:
        return decay ** (epoch // every)
    return decay ** sum(e // every for e in range(1, epoch + 1))
