"""The VAE's residual blocks with fewer full-size activations alive at once, for inference.

diffusers' ``ResnetBlock2D`` keeps the normalised input beside its SiLU, and the sum beside its division
by ``output_scale_factor`` (1 in the VAE): at the full-resolution blocks (128-256 channels at the
processing size) that is two activations more than needed, 0.5-1 GiB at 1024² in bfloat16. Here the SiLU
runs in place on the normalised copy and the residual is added in place: the same operations in the same
order (the same values), two fewer buffers. Only without gradients (inference, the frozen VAE in training);
otherwise, or for blocks with a time embedding or resampling (none in the VAE), diffusers' own forward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class InferenceResnetBlock2D(ResnetBlock2D):
    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        lean = (not torch.is_grad_enabled() and temb is None and not args and not kwargs
                and self.upsample is None and self.downsample is None and self.time_embedding_norm in ("default", "group")
                and isinstance(self.nonlinearity, nn.SiLU) and isinstance(self.dropout, nn.Dropout))
        if not lean:
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = F.silu(self.norm1(input_tensor), inplace=True)
        hidden = self.conv1(hidden)
        hidden = F.silu(self.norm2(hidden), inplace=True)
        hidden = self.conv2(self.dropout(hidden))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        hidden += shortcut
        return hidden if self.output_scale_factor == 1 else hidden.div_(self.output_scale_factor)


def lean_vae_resnets(vae: nn.Module) -> None:
    """Make the VAE's residual blocks ``InferenceResnetBlock2D`` (in place; the parameters are kept)."""
    for module in vae.modules():
        if type(module) is ResnetBlock2D:
            module.__class__ = InferenceResnetBlock2D
