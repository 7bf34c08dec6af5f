"""The VAE with fewer full-size activations alive at once, for inference: same operations, same values.

Two changes, both only without gradients (inference, the frozen VAE in training) and outside
``torch.compile``; otherwise diffusers' own forwards run.

``InferenceResnetBlock2D``: diffusers' ``ResnetBlock2D`` keeps the normalised input beside its SiLU, and
the sum beside its division by ``output_scale_factor`` (1 in the VAE). Here the SiLU runs in place on the
normalised copy and the residual is added in place: two fewer buffers.

``BandedEncoder`` / ``BandedDecoder``: at the large sizes (the VAE's first and last blocks run at the full
processing size: 128-256 channels at 1024², 256-512 MiB each in bfloat16) every residual block, up- and
down-sampler and the output convolution run in bands of rows, each band's convolution reading its
neighbours' rows (the halo) and each group norm applying whole-image statistics, gathered in a first pass
over the input (Chan's pairwise combination, in float64). A band's working copies are a few tens of MiB,
so a block holds its input and its inner activation and nothing else: the residual sum is written over
the block's input (channels-last storage, rows in increasing order, so every row is read before it is
overwritten). Small activations (the latent-size middle block, the 1/8 and 1/4 scales at 1024²) run
through the modules as before.

Measured (1024², bfloat16, released layout, 2-core EPYC): peak of the decode 2.35 -> 0.8 GiB above the
weights; the outputs differ from the unbanded ones only by summation order (``tests/test_vae_memory.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

# Float32 working set of one band (the normalised rows and the convolution's input); the band's rows
# follow from the tensor's width and channels. Tests make it small to force many bands.
BAND_BYTES = 32 * 2**20


class InferenceResnetBlock2D(ResnetBlock2D):
    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if not (_lean_resnet(self) and temb is None and not args and not kwargs and _inference()):
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = F.silu(self.norm1(input_tensor), inplace=True)
        hidden = self.conv1(hidden)
        hidden = F.silu(self.norm2(hidden), inplace=True)
        hidden = self.conv2(self.dropout(hidden))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        hidden += shortcut
        return hidden if self.output_scale_factor == 1 else hidden.div_(self.output_scale_factor)


def _inference() -> bool:
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _lean_resnet(block: ResnetBlock2D) -> bool:
    return (block.upsample is None and block.downsample is None and block.time_embedding_norm in ("default", "group")
            and isinstance(block.nonlinearity, nn.SiLU) and isinstance(block.dropout, nn.Dropout))


# ---------------------------------------------------------------------------------------- banded parts
def _band_rows(channels: int, width: int) -> int:
    """Rows per band (even, for the 2x up-sampler): BAND_BYTES of float32 at this width and channels."""
    return max(2, BAND_BYTES // (channels * width * 4) // 2 * 2)


def _bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + rows, height)) for start in range(0, height, rows)]


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last)


def _empty_like(x: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape[0], channels, height, width, dtype=x.dtype, device=x.device, memory_format=layout)


class _WholeImageGroupNorm:
    """``norm`` (a GroupNorm) applied to rows of ``x`` with the statistics of the whole of ``x`` (one image)."""

    def __init__(self, norm: nn.GroupNorm, x: torch.Tensor):
        groups, channels = norm.num_groups, x.shape[1]
        # The group norm kernel gives each band's statistics in one fast pass (torch's generic reductions over
        # a channels-last tensor's rows are 6x slower); float32 ones directly from bfloat16 on the CPU.
        mixed = x.device.type == "cpu" and x.dtype == torch.bfloat16
        ones = torch.ones(channels, dtype=torch.float32, device=x.device) if mixed else None
        zeros = torch.zeros_like(ones) if mixed else None
        count, mean, m2 = 0, None, None
        for start, stop in _bands(x.shape[2], _band_rows(channels, x.shape[3])):
            band = x[:, :, start:stop] if mixed else x[:, :, start:stop].float()
            if not (band.is_contiguous() or _channels_last(band)):  # rows of a channels-first tensor
                band = band.contiguous()
            n = band[0].numel() // groups  # values per group in this band
            pixels = band[0, 0].numel()
            _, band_mean, rstd = torch.ops.aten.native_group_norm(band, ones, zeros, 1, channels, pixels, groups, 0.0)
            band_mean = band_mean[0].double()
            band_m2 = rstd[0].double().pow(-2).nan_to_num(0.0, 0.0, 0.0) * n  # rstd = 1/sqrt(variance)
            if mean is None:
                mean, m2 = band_mean, band_m2
            else:  # Chan et al.: exact pairwise combination of means and sums of squared deviations
                delta = band_mean - mean
                mean = mean + delta * (n / (count + n))
                m2 = m2 + band_m2 + delta.square() * (count * n / (count + n))
            count += n
        per_group = channels // groups
        self.mean = mean.float().repeat_interleave(per_group)
        self.var = (m2 / count).float().repeat_interleave(per_group)
        self.weight = norm.weight.float() if norm.weight is not None else None
        self.bias = norm.bias.float() if norm.bias is not None else None
        self.eps = norm.eps

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        # Per-channel statistics given: batch norm's evaluation kernel is exactly the group norm's affine step.
        return F.batch_norm(rows, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


def _conv_rows(conv: nn.Conv2d, rows: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """``conv`` over ``rows`` whose missing neighbours above/below (the image border) are ``top``/``bottom``
    zero rows, as the convolution's own padding would add them."""
    if top or bottom:
        rows = F.pad(rows, (0, 0, top, bottom))
    return F.conv2d(rows, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


def _norm_act_conv(x: torch.Tensor, norm: nn.GroupNorm | None, conv: nn.Conv2d, out: torch.Tensor,
                   residual=None) -> torch.Tensor:
    """out = conv(silu(norm(x))) [+ residual(start, stop)], band by band (a 'same'-padded, stride-1 conv)."""
    statistics = _WholeImageGroupNorm(norm, x) if norm is not None else None
    height, halo = x.shape[2], conv.padding[0]
    for start, stop in _bands(height, _band_rows(max(x.shape[1], out.shape[1]), x.shape[3])):
        low, high = max(start - halo, 0), min(stop + halo, height)
        rows = x[:, :, low:high]
        if statistics is not None:
            rows = F.silu(statistics(rows), inplace=True)
        y = _conv_rows(conv, rows, halo - (start - low), halo - (high - stop))
        if residual is not None:
            y += residual(start, stop)
        out[:, :, start:stop] = y
    return out


def _over_input(x: torch.Tensor, channels: int) -> torch.Tensor | None:
    """A channels-last view of ``x``'s storage for an output with ``channels`` ≤ x's channels, rows in the
    same order: output rows [0, r) lie within x's rows [0, r), so writing rows in increasing order, after
    reading the same rows of x, never overwrites a row still to be read."""
    if x.shape[0] != 1 or channels > x.shape[1] or not _channels_last(x):
        return None
    _, _, height, width = x.shape
    return x.as_strided((1, channels, height, width), (height * width * channels, 1, width * channels, channels))


def _resnet(block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` in bands; x (an activation this forward owns) is overwritten by the result."""
    _, _, height, width = x.shape
    hidden = _norm_act_conv(x, block.norm1, block.conv1, _empty_like(x, block.conv1.out_channels, height, width))
    channels = block.conv2.out_channels
    out = _over_input(x, channels)
    if out is None:
        out = _empty_like(x, channels, height, width)

    def shortcut(start: int, stop: int) -> torch.Tensor:
        rows = x[:, :, start:stop]
        return block.conv_shortcut(rows) if block.conv_shortcut is not None else rows

    _norm_act_conv(hidden, block.norm2, block.conv2, out, shortcut)
    return out if block.output_scale_factor == 1 else out.div_(block.output_scale_factor)


def _upsample(block: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest 2x(x)) in bands of output rows, each from the input rows it needs."""
    _, _, height, width = x.shape
    conv = block.conv
    out = _empty_like(x, conv.out_channels, 2 * height, 2 * width)
    for start, stop in _bands(2 * height, _band_rows(max(x.shape[1], conv.out_channels), 2 * width)):
        source_start, source_stop = max(start // 2 - 1, 0), min((stop + 1) // 2 + 1, height)
        upsampled = F.interpolate(x[:, :, source_start:source_stop], scale_factor=2.0, mode="nearest")
        low, high = max(start - 1, 0), min(stop + 1, 2 * height)
        rows = upsampled[:, :, low - 2 * source_start:high - 2 * source_start]
        out[:, :, start:stop] = _conv_rows(conv, rows, 1 - (start - low), 1 - (high - stop))
    return out


def _downsample(block: Downsample2D, x: torch.Tensor) -> torch.Tensor:
    """pad right/bottom by one, then the 3x3 stride-2 conv (diffusers' padding=0 form), in bands."""
    _, _, height, width = x.shape
    conv = block.conv
    out_height, out_width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
    out = _empty_like(x, conv.out_channels, out_height, out_width)
    for start, stop in _bands(out_height, max(1, _band_rows(x.shape[1], width) // 2)):
        low, high = 2 * start, 2 * (stop - 1) + 3  # rows of the padded input (height + 1 rows)
        rows = F.pad(x[:, :, low:min(high, height)], (0, 1, 0, high - min(high, height)))
        out[:, :, start:stop] = F.conv2d(rows, conv.weight, conv.bias, conv.stride, 0)
    return out


def _one_band(x: torch.Tensor) -> bool:
    return x.shape[2] <= _band_rows(x.shape[1], x.shape[3])


def _run_resnet(block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    return block(x) if _one_band(x) or not _lean_resnet(block) or x.shape[0] != 1 else _resnet(block, x)


def _run_upsample(block: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    plain = (block.norm is None and block.use_conv and not block.use_conv_transpose and block.interpolate
             and block.name == "conv" and block.conv.kernel_size == (3, 3) and block.conv.padding == (1, 1)
             and block.conv.stride == (1, 1))
    return block(x) if _one_band(x) or not plain else _upsample(block, x)


def _run_downsample(block: Downsample2D, x: torch.Tensor) -> torch.Tensor:
    plain = (block.norm is None and block.use_conv and block.padding == 0 and block.conv.kernel_size == (3, 3)
             and block.conv.stride == (2, 2) and x.shape[2] >= 2 and x.shape[3] >= 2)
    return block(x) if _one_band(x) or not plain else _downsample(block, x)


def _run_output(model: Encoder | Decoder, x: torch.Tensor) -> torch.Tensor:
    """conv_out(silu(conv_norm_out(x)))."""
    if _one_band(x):
        return model.conv_out(model.conv_act(model.conv_norm_out(x)))
    out = _empty_like(x, model.conv_out.out_channels, *x.shape[2:])
    return _norm_act_conv(x, model.conv_norm_out, model.conv_out, out)


def _bandable(model: Encoder | Decoder) -> bool:
    return (isinstance(model.conv_norm_out, nn.GroupNorm) and isinstance(model.conv_act, nn.SiLU)
            and model.conv_out.stride == (1, 1) and model.conv_out.padding == (1, 1))


class BandedEncoder(Encoder):
    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        if not (_inference() and _bandable(self)):
            return super().forward(sample)
        return torch.cat([self._one_image(image) for image in sample.split(1)])

    def _one_image(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            for resnet in down_block.resnets:
                sample = _run_resnet(resnet, sample)
            for downsampler in down_block.downsamplers or []:
                sample = _run_downsample(downsampler, sample)
        return _run_output(self, self.mid_block(sample))


class BandedDecoder(Decoder):
    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if not (_inference() and latent_embeds is None and _bandable(self)):
            return super().forward(sample, latent_embeds)
        return torch.cat([self._one_image(latent) for latent in sample.split(1)])

    def _one_image(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for up_block in self.up_blocks:
            for resnet in up_block.resnets:
                sample = _run_resnet(resnet, sample)
            for upsampler in up_block.upsamplers or []:
                sample = _run_upsample(upsampler, sample)
        return _run_output(self, sample)


def lean_vae(vae: nn.Module) -> None:
    """Make the VAE's residual blocks ``InferenceResnetBlock2D`` and its encoder and decoder banded (in
    place; the parameters are kept)."""
    for module in vae.modules():
        if type(module) is ResnetBlock2D:
            module.__class__ = InferenceResnetBlock2D
        elif type(module) is Encoder:
            module.__class__ = BandedEncoder
        elif type(module) is Decoder:
            module.__class__ = BandedDecoder
