"""DiffDISPipeline behaviour users rely on: inputs, sizes, batches, seeds, dtypes, options."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from tolerances import assert_close_across_kernels
from PIL import Image

from diffdis_core import DiffDISError, DiffDISPipeline

RES = 64  # the tiny fixture model's processing resolution


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_non_square_input_returns_its_own_size(tiny_pipeline):
    out = tiny_pipeline(random_image(37, 90), processing_res=RES, generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (1, 1, 37, 90) and out.edge.shape == (1, 1, 37, 90)
    assert out.mask.dtype == torch.float32
    assert 0 <= out.mask.min() and out.mask.max() <= 1


def test_same_seed_same_mask_other_seed_other_mask(tiny_pipeline):
    image = random_image(48, 48)
    first = tiny_pipeline(image, processing_res=RES, generator=torch.Generator().manual_seed(7)).mask
    second = tiny_pipeline(image, processing_res=RES, generator=torch.Generator().manual_seed(7)).mask
    other = tiny_pipeline(image, processing_res=RES, generator=torch.Generator().manual_seed(8)).mask
    assert torch.equal(first, second)
    assert (first - other).abs().max() > 1e-3


def test_batch_equals_per_image_results(tiny_pipeline):
    images = [random_image(40, 56, seed=1), random_image(40, 56, seed=2)]
    noise = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(3))
    batched = tiny_pipeline(images, processing_res=RES, latents=noise)
    for index, image in enumerate(images):
        single = tiny_pipeline(image, processing_res=RES, latents=noise[index:index + 1])
        assert_close_across_kernels(batched.mask[index], single.mask[0])
        assert_close_across_kernels(batched.edge[index], single.edge[0])


def test_one_unet_call_of_2b_per_batch(tiny_pipeline, monkeypatch):
    calls = []
    original = tiny_pipeline.unet.forward

    def spy(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(tiny_pipeline.unet, "forward", spy)
    tiny_pipeline([random_image(32, 32, seed=s) for s in range(3)], processing_res=RES)
    assert calls == [6]


def test_input_forms_agree(tiny_pipeline):
    image = random_image(24, 40)
    array = np.asarray(image)
    uint8 = torch.tensor(array).permute(2, 0, 1)[None]
    noise = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    results = [tiny_pipeline(x, processing_res=RES, latents=noise).mask for x in (image, [image], array, uint8)]
    for other in results[1:]:  # 8-bit inputs are resized in 8 bits, whatever their container
        assert torch.equal(results[0], other)
    # A float image is resized in float: the same up to the 8-bit rounding of the resized input.
    as_float = tiny_pipeline(uint8.float() / 255, processing_res=RES, latents=noise).mask
    assert (as_float - results[0]).abs().max() <= 1e-2 * results[0].abs().max()


def test_the_output_is_one_tensor_whatever_the_input_sizes(tiny_pipeline, monkeypatch):
    """Same-size inputs: [B, 1, H, W] at their size. Mixed sizes: [B, 1, R, R] at the processing size with
    output_size=False, and at their own sizes a one-line error that says so, before any work."""
    same = tiny_pipeline([random_image(20, 30), random_image(20, 30, seed=1)], processing_res=RES)
    assert isinstance(same.mask, torch.Tensor) and same.mask.shape == same.edge.shape == (2, 1, 20, 30)
    mixed = [random_image(20, 30), random_image(50, 10)]
    square = tiny_pipeline(mixed, processing_res=RES, output_size=False)
    assert isinstance(square.mask, torch.Tensor) and square.mask.shape == square.edge.shape == (2, 1, RES, RES)
    monkeypatch.setattr(tiny_pipeline, "encode_condition", lambda *a, **k: pytest.fail("checked after work began"))
    with pytest.raises(DiffDISError, match=r"differ in size \(20x30, 50x10\).*output_size=False"):
        tiny_pipeline(mixed, processing_res=RES)


def test_mask_only_skips_the_edge_decode(tiny_pipeline, monkeypatch):
    decoded = []
    original = tiny_pipeline.decode_maps

    def spy(latents, batch_size=None):
        decoded.append(latents.shape[0])
        return original(latents, batch_size)

    monkeypatch.setattr(tiny_pipeline, "decode_maps", spy)
    out = tiny_pipeline(random_image(32, 32), processing_res=RES, decode_edge=False)
    assert out.edge is None and decoded == [1]


def test_minmax_off_keeps_raw_maps(tiny_pipeline):
    image = random_image(RES, RES)  # no resize, so the normalisation is visible exactly
    noise = torch.randn(1, 4, 8, 8)
    raw = tiny_pipeline(image, processing_res=RES, latents=noise, minmax=False).mask
    normalised = tiny_pipeline(image, processing_res=RES, latents=noise, minmax=True).mask
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert torch.allclose(normalised, expected, atol=1e-5)
    assert not torch.allclose(raw, normalised, atol=1e-3)


def test_tta_runs_six_views_and_averages(tiny_pipeline, monkeypatch):
    calls = []
    original = tiny_pipeline.unet.forward

    def spy(sample, *args, **kwargs):
        calls.append(tuple(sample.shape[-2:]))
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(tiny_pipeline.unet, "forward", spy)
    image = random_image(30, 44)
    out = tiny_pipeline(image, processing_res=256, tta=True, generator=torch.Generator().manual_seed(0))
    assert calls == [(24, 24), (32, 32), (40, 40)] * 2  # flip outer, scale inner, as the authors
    assert out.mask.shape == (1, 1, 30, 44)
    plain = tiny_pipeline(image, processing_res=256, generator=torch.Generator().manual_seed(0)).mask
    assert (out.mask - plain).abs().max() > 1e-3


def test_ensemble_mean_averages_draws(tiny_pipeline):
    image = random_image(32, 32)
    latents = tiny_pipeline.segment(tiny_pipeline.encode_condition(image, RES), ensemble_size=3,
                                    generator=torch.Generator().manual_seed(0))
    assert latents.views[0].mask_latents.shape == (3, 1, 4, 8, 8)
    raw = tiny_pipeline.decode(latents, minmax=False, output_size=False, ensemble_reduction="mean").mask
    per_draw = torch.stack([tiny_pipeline.decode_maps(latents.views[0].mask_latents[d]) for d in range(3)])
    assert torch.allclose(raw, per_draw.mean(0), atol=1e-5)
    median = tiny_pipeline.decode(latents, output_size=False).mask  # the default: the authors' aligned median
    assert (median - minmax(per_draw.mean(0))).abs().max() > 1e-3


def minmax(x):
    return (x - x.min()) / (x.max() - x.min())


def test_decode_never_puts_more_than_one_kind_of_one_draw_of_one_view_through_the_vae(tiny_pipeline, monkeypatch):
    batches = []
    original = tiny_pipeline.vae.decoder.forward

    def spy(z, *args, **kwargs):
        batches.append(z.shape[0])
        return original(z, *args, **kwargs)

    monkeypatch.setattr(tiny_pipeline.vae.decoder, "forward", spy)
    images = [random_image(16, 16, seed=s) for s in range(2)]
    tiny_pipeline(images, processing_res=256, tta=True, ensemble_size=2, ensemble_reduction="mean",
                  generator=torch.Generator().manual_seed(0))
    assert batches == [2] * 24  # 6 views x 2 draws x (mask, edge), each time the 2 images
    batches.clear()
    latents = tiny_pipeline.segment(tiny_pipeline.encode_condition(images, RES), ensemble_size=3,
                                    generator=torch.Generator().manual_seed(0))
    tiny_pipeline.decode(latents, decode_edge=False, ensemble_reduction="mean", batch_size=1)
    assert batches == [1] * 6


def test_tiled_decode_matches_the_whole_decode_away_from_nothing_but_tile_blending(tiny_pipeline, monkeypatch):
    latents = tiny_pipeline.segment(tiny_pipeline.encode_condition(random_image(64, 64), 512),
                                    generator=torch.Generator().manual_seed(0)).mask_latents
    whole = tiny_pipeline.decode_maps(latents)
    # Tiles of 256 px instead of 1024 px, so a 512² map is decoded in tiles.
    monkeypatch.setattr(tiny_pipeline.vae, "tile_sample_min_size", 256)
    monkeypatch.setattr(tiny_pipeline.vae, "tile_latent_min_size", 32)
    tiled = tiny_pipeline.decode_maps(latents)
    assert tiny_pipeline.vae.use_tiling is False  # switched on for the call only
    difference = (tiled - whole).abs()
    # The VAE's mid-block attention sees the whole map, so tiles differ a little everywhere.
    assert difference.mean() <= 0.01 and difference.max() <= 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(official_tiny, dtype):
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.dtype == dtype
    # float16 keeps the VAE in float32 (force_upcast), bfloat16 does not need to.
    assert pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    reference = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    image, noise = random_image(32, 32), torch.randn(1, 4, 8, 8)
    half = pipe(image, processing_res=RES, latents=noise, minmax=False).mask
    full = reference(image, processing_res=RES, latents=noise, minmax=False).mask
    assert half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.05


@pytest.mark.parametrize("res, tta, message", [
    (0, False, "got 0: use 64$"),
    (60, False, "got 60: use 64$"),
    (72, False, "multiple of 64 from 64 to 4096, got 72: use 64 or 128$"),
    (1000, False, "got 1000: use 960 or 1024$"),
    ("64", False, "whole number"),
    (True, False, "whole number"),
    (320, True, "multiple of 256 .* with TTA .*got 320: use 256 or 512$"),
    (5000, False, "got 5000: use 4096$"),
])
def test_bad_processing_res_is_a_clear_error_naming_the_nearest_valid_sizes(tiny_pipeline, res, tta, message):
    with pytest.raises(DiffDISError, match=message):
        tiny_pipeline(random_image(8, 8), processing_res=res, tta=tta)


def test_wrong_latents_shape_is_a_clear_error(tiny_pipeline):
    with pytest.raises(DiffDISError, match=r"latents\[0\] must have shape \[1, 4, 8, 8\]"):
        tiny_pipeline(random_image(8, 8), processing_res=RES, latents=torch.randn(1, 4, 16, 16))


def test_sixteen_bit_images_keep_their_content(tiny_pipeline):
    gray = (np.random.default_rng(0).random((40, 40)) * 65535).astype(np.uint16)
    sixteen = Image.frombytes("I;16", (40, 40), gray.tobytes())
    eight = Image.fromarray((gray // 257).astype(np.uint8), mode="L")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from_16 = tiny_pipeline(sixteen, processing_res=RES, latents=noise, minmax=False).mask
    from_8 = tiny_pipeline(eight, processing_res=RES, latents=noise, minmax=False).mask
    assert (from_16 - from_8).abs().max() <= 0.02  # the same picture, not a white one
    white = tiny_pipeline(Image.new("L", (40, 40), 255), processing_res=RES, latents=noise, minmax=False).mask
    assert (from_16 - white).abs().mean() > 5 * (from_16 - from_8).abs().mean()


def test_tta_needs_the_conditions_image(tiny_pipeline):
    condition = tiny_pipeline.encode_condition(random_image(16, 16), 256, keep_image=False)
    assert condition.image is None
    with pytest.raises(DiffDISError, match="keep_image=True"):
        tiny_pipeline.segment(condition, tta=True)


def test_non_finite_outputs_are_an_error_not_an_empty_cutout(official_tiny):
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    with torch.no_grad():
        pipe.unet.conv_out.weight.fill_(float("nan"))
    with pytest.raises(DiffDISError, match="NaN or infinite.*damaged"):
        pipe(random_image(16, 16), processing_res=RES)


def test_a_diffusers_pipeline(official_tiny):
    from diffusers import DiffusionPipeline

    loaded = DiffDISPipeline.from_pretrained(official_tiny, base=None)  # its own: the casts below are lossy
    assert isinstance(loaded, DiffusionPipeline)
    assert set(loaded.components) == {"unet", "vae", "scheduler"}
    loaded.set_progress_bar_config(disable=True)
    pipe = DiffDISPipeline(**loaded.components, empty_text_embed=loaded.empty_text_embed)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16 and pipe.vae_dtype == torch.bfloat16
    pipe.to(torch.float16)
    assert pipe.dtype == torch.float16 and pipe.vae_dtype == torch.float32  # force_upcast: no fp16 VAE
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_compile_option_wraps_the_modules(official_tiny):
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None).compile(backend="eager")
    out = pipe(random_image(16, 16), processing_res=RES, generator=torch.Generator().manual_seed(0))
    reference = DiffDISPipeline.from_pretrained(official_tiny, base=None)(
        random_image(16, 16), processing_res=RES, generator=torch.Generator().manual_seed(0))
    assert pipe.unet._compiled_call_impl is not None
    assert torch.allclose(out.mask, reference.mask, atol=1e-5)


def test_save_pretrained_gives_a_loadable_complete_folder(tmp_path, tiny_pipeline):
    old_umask = os.umask(0o022)
    try:
        folder = tiny_pipeline.save_pretrained(tmp_path / "copy")
    finally:
        os.umask(old_umask)
    assert (folder / "empty_text_embed.safetensors").is_file()
    # Readable by others as the umask says (safetensors alone writes 0600).
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o644}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiffDISPipeline"
    assert index["unet"] == ["diffdis_core.unet", "DiffDISUNet"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    again = DiffDISPipeline.from_pretrained(folder, base=None)
    image, noise = random_image(16, 16), torch.randn(1, 4, 8, 8)
    assert torch.allclose(again(image, processing_res=RES, latents=noise).mask,
                          tiny_pipeline(image, processing_res=RES, latents=noise).mask, atol=1e-6)


def test_model_cpu_offload_runs_through_the_hooks(official_tiny, tiny_pipeline):
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks' plumbing; on a GPU they also move the weights
    image, noise = random_image(16, 16), torch.randn(1, 4, 8, 8)
    offloaded = pipe(image, processing_res=RES, latents=noise).mask
    assert torch.allclose(offloaded, tiny_pipeline(image, processing_res=RES, latents=noise).mask, atol=1e-6)


def test_refine_edges_brings_masks_to_large_inputs_along_their_edges(tiny_pipeline):
    big = random_image(150, 200)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = tiny_pipeline(big, processing_res=RES, latents=noise, decode_edge=False).mask
    refined = tiny_pipeline(big, processing_res=RES, latents=noise, decode_edge=False, refine_edges=True).mask
    square = tiny_pipeline(big, processing_res=RES, latents=noise, decode_edge=False, output_size=False).mask
    from diffdis_core import refine_alpha

    expected = refine_alpha(torch.from_numpy(np.array(big)).permute(2, 0, 1)[None].float() / 255, square)
    assert refined.shape == plain.shape == (1, 1, 150, 200)
    assert torch.allclose(refined, expected, atol=1e-6)
    assert (refined - plain).abs().max() > 1e-3  # the refinement did something
