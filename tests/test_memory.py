"""Memory: loading into a lower precision without a float32 copy of the weights."""

import weakref

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffdis_core import DiffDISPipeline, DiffDISUNet, vae_memory
from tolerances import assert_close_across_kernels


class LiveFloat32Bytes(TorchDispatchMode):
    """The most float32 (or ``dtype``) tensor bytes alive at once (storages counted once), over every operation."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.alive: dict[int, tuple[weakref.ref, int]] = {}  # storage address -> (a tensor on it, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, out)):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == self.dtype and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                self.alive[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if v[0]() is not None}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


def test_loading_into_bfloat16_holds_one_float32_tensor_at_a_time(official_tiny):
    weights = official_tiny / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
    largest = max(4 * torch.Size(s).numel() for s in sizes)
    total = sum(4 * torch.Size(s).numel() for s in sizes)
    assert total > 20 * largest  # the bound below is far from the whole file
    with LiveFloat32Bytes() as tracked:
        unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    assert tracked.peak >= largest  # the reads were seen
    assert tracked.peak <= 2 * largest, (tracked.peak, largest, total)


def test_pipeline_reads_the_unet_in_its_dtype(official_tiny, monkeypatch):
    from diffdis_core import pipeline

    asked = []
    read = pipeline.read_unet_state_dict
    monkeypatch.setattr(pipeline, "read_unet_state_dict",
                        lambda path, dtype=None, layout=None: asked.append(dtype) or read(path, dtype, layout))
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype=torch.bfloat16)
    assert asked == [torch.bfloat16] and pipe.unet.dtype == torch.bfloat16


def test_weights_are_read_in_the_layout_they_run_in(official_tiny):
    """Loaded channels-last for the CPU, so the pipeline never converts (and holds twice) a weight."""
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype=torch.bfloat16)
    convs = [m.weight for m in (*pipe.unet.modules(), *pipe.vae.modules())
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    before = [w.data_ptr() for w in convs]
    pipe.set_channels_last(True)
    assert [w.data_ptr() for w in convs] == before


def test_gpu_check_dry_run_on_the_cpu(capsys):
    """benchmarks/gpu_check.py's every row, on the CPU at a tiny size: parity, speed rows, the nodes' call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--tiny", "--size", "64", "--repeats", "1", "--dtypes", "fp32",
                           "--compile", "off"])
    printed = capsys.readouterr().out
    checks = [row["check"] for row in rows]
    assert len(rows) == 5 and all(row["check"] in printed for row in rows)
    assert [row.get("ok") for row in rows if row["check"].startswith(("parity", "Remove"))] == [True] * 3, rows
    assert sum(row["check"].startswith("fp32") for row in rows) == 2 and "mask + edge" in checks[3]
    assert all(row["seconds"] > 0 for row in rows[2:])


def small_vae(dtype: torch.dtype = torch.float32, channels_last: bool = True):
    """A VAE shaped like SD's (three scales, two blocks each, groups of 4 channels), norms not trivial."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8).eval()
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.data.normal_(1, 0.3)
            module.bias.data.normal_(0, 0.3)
    for parameter in vae.parameters():
        parameter.data = parameter.data.to(dtype)
    vae = vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    vae_memory.lean_vae(vae)
    return vae


def unbanded(module, *args):
    """diffusers' own forward of a banded encoder or decoder."""
    return type(module).__mro__[1].forward(module, *args)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_banded_vae_computes_what_diffusers_does(monkeypatch, channels_last):
    """Encoder and decoder in bands of a few rows (odd sizes, a batch of two) = the whole-image forward."""
    monkeypatch.setattr(vae_memory, "BAND_BYTES", 32 * 66 * 4 * 3)  # 2 rows at the largest scale
    vae = small_vae(channels_last=channels_last)
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 70, 66, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 9, 7, generator=generator)
    if channels_last:
        image, latents = (t.contiguous(memory_format=torch.channels_last) for t in (image, latents))
    with torch.inference_mode():
        for module, given in ((vae.encoder, image), (vae.decoder, latents)):
            kept = given.clone()
            banded, whole = module(given), unbanded(module, given)
            assert_close_across_kernels(banded, whole)
            assert torch.equal(given, kept)  # the caller's tensor was not written over


def test_the_banded_vae_in_bfloat16_is_as_close_to_float32_as_the_unbanded(monkeypatch):
    monkeypatch.setattr(vae_memory, "BAND_BYTES", 32 * 66 * 4 * 4)
    reference, vae = small_vae(torch.float32), small_vae(torch.bfloat16)
    image = (torch.rand(1, 3, 70, 66, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    image = image.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference.decoder(reference.encoder(image)[:, :4])
        plain = unbanded(vae.decoder, unbanded(vae.encoder, image.bfloat16())[:, :4]).float()
        banded = vae.decoder(vae.encoder(image.bfloat16())[:, :4]).float()
    scale = expected.abs().max()
    plain_error, banded_error = ((x - expected).abs().max() / scale for x in (plain, banded))
    assert banded_error <= 1.5 * plain_error + 1e-3, (banded_error, plain_error)


def test_the_banded_decoder_holds_about_two_full_size_activations(monkeypatch):
    """The memory it is for: the decode's live activations at their peak, banded vs whole-image."""
    monkeypatch.setattr(vae_memory, "BAND_BYTES", 32 * 128 * 4 * 8)
    vae = small_vae(torch.bfloat16)
    latents = torch.randn(1, 4, 32, 32).bfloat16().contiguous(memory_format=torch.channels_last)
    full_size = 32 * 128 * 128 * 2  # the last blocks' activation at the output size, in bytes
    weights = sum(p.numel() * 2 for p in vae.decoder.parameters())
    peaks = {}
    with torch.inference_mode():
        for name, decode in (("banded", vae.decoder), ("whole", lambda z: unbanded(vae.decoder, z))):
            with LiveFloat32Bytes(torch.bfloat16) as tracked:
                decode(latents)
            peaks[name] = (tracked.peak - weights) / full_size
    assert peaks["whole"] > 4.5, peaks
    assert peaks["banded"] < 3.5, peaks  # the up-sampler's output (2) and a block's inner activation (1)


def test_the_pipeline_decodes_the_same_in_bands(tiny_pipeline, monkeypatch):
    """End to end at 256² (the tiny VAE's full-size blocks in 8-row bands): the maps are unchanged."""
    image = torch.rand(1, 3, 200, 240, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    whole = tiny_pipeline(image, processing_res=256, latents=noise)
    monkeypatch.setattr(vae_memory, "BAND_BYTES", 32 * 256 * 4 * 8)
    banded = tiny_pipeline(image, processing_res=256, latents=noise)
    assert_close_across_kernels(banded.mask, whole.mask)
    assert_close_across_kernels(banded.edge, whole.edge)


def test_feed_forwards_in_chunks_of_any_length_give_the_same_maps(tiny_pipeline, monkeypatch):
    """The UNet's feed-forwards on 7 tokens at a time (no divisor of any level's length) = whole."""
    from diffdis_core.unet import ChunkedFeedForward

    assert any(type(m) is ChunkedFeedForward for m in tiny_pipeline.unet.modules())
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    whole = tiny_pipeline(image, processing_res=64, latents=noise)
    calls = []
    monkeypatch.setattr(ChunkedFeedForward, "chunk_tokens", 7)
    monkeypatch.setattr(ChunkedFeedForward, "__call__", lambda self, x: calls.append(x.shape[1]) or
                        torch.nn.Module.__call__(self, x))
    chunked = tiny_pipeline(image, processing_res=64, latents=noise)
    assert calls and max(calls) > 7  # the blocks' sequences were longer than a chunk
    assert_close_across_kernels(chunked.mask, whole.mask)
    assert_close_across_kernels(chunked.edge, whole.edge)
