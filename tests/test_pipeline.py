"""DiffDISPipeline behaviour users rely on: inputs, sizes, batches, seeds, dtypes, options."""

import numpy as np
import pytest
import torch
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
        assert torch.allclose(batched.mask[index], single.mask[0], atol=1e-5)
        assert torch.allclose(batched.edge[index], single.edge[0], atol=1e-5)


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
    tensor = torch.tensor(array).permute(2, 0, 1)[None].float() / 255
    noise = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    results = [tiny_pipeline(x, processing_res=RES, latents=noise).mask for x in (image, [image], array, tensor)]
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-6)


def test_mixed_sizes_give_one_map_per_image(tiny_pipeline):
    out = tiny_pipeline([random_image(20, 30), random_image(50, 10)], processing_res=RES)
    assert isinstance(out.mask, list)
    assert [tuple(m.shape) for m in out.mask] == [(1, 1, 20, 30), (1, 1, 50, 10)]


def test_mask_only_skips_the_edge_decode(tiny_pipeline, monkeypatch):
    decoded = []
    original = tiny_pipeline.decode_maps

    def spy(latents):
        decoded.append(latents.shape[0])
        return original(latents)

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
    out = tiny_pipeline(image, processing_res=RES, tta=True, generator=torch.Generator().manual_seed(0))
    assert sorted(calls) == sorted([(8, 8), (8, 8), (6, 6), (6, 6), (10, 10), (10, 10)])
    assert out.mask.shape == (1, 1, 30, 44)
    plain = tiny_pipeline(image, processing_res=RES, generator=torch.Generator().manual_seed(0)).mask
    assert (out.mask - plain).abs().max() > 1e-3


def test_ensemble_averages_draws(tiny_pipeline):
    image = random_image(32, 32)
    latents = tiny_pipeline.segment(tiny_pipeline.encode_condition(image, RES), ensemble_size=3,
                                    generator=torch.Generator().manual_seed(0))
    assert latents.views[0].mask_latents.shape == (3, 1, 4, 8, 8)
    raw = tiny_pipeline.decode(latents, minmax=False, output_size=False).mask
    per_draw = torch.stack([tiny_pipeline.decode_maps(latents.views[0].mask_latents[d]) for d in range(3)])
    assert torch.allclose(raw, per_draw.mean(0), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float32(official_tiny, dtype):
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.empty_text_embed.dtype == dtype
    # float16 keeps the VAE in float32 (force_upcast), bfloat16 does not need to.
    assert pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    reference = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    image, noise = random_image(32, 32), torch.randn(1, 4, 8, 8)
    half = pipe(image, processing_res=RES, latents=noise, minmax=False).mask
    full = reference(image, processing_res=RES, latents=noise, minmax=False).mask
    assert half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.05


@pytest.mark.parametrize("res", [0, 60, 63, "64"])
def test_bad_processing_res_is_a_clear_error(tiny_pipeline, res):
    with pytest.raises(DiffDISError, match="multiple of 8"):
        tiny_pipeline(random_image(8, 8), processing_res=res)


def test_wrong_latents_shape_is_a_clear_error(tiny_pipeline):
    with pytest.raises(DiffDISError, match=r"latents must have shape \[1, 4, 8, 8\]"):
        tiny_pipeline(random_image(8, 8), processing_res=RES, latents=torch.randn(1, 4, 16, 16))


def test_non_multiple_of_64_resolution_still_works(tiny_pipeline):
    out = tiny_pipeline(random_image(33, 21), processing_res=72)
    assert out.mask.shape == (1, 1, 33, 21) and torch.isfinite(out.mask).all()


def test_save_pretrained_gives_a_loadable_complete_folder(tmp_path, tiny_pipeline):
    folder = tiny_pipeline.save_pretrained(tmp_path / "copy")
    assert (folder / "empty_text_embed.safetensors").is_file()
    again = DiffDISPipeline.from_pretrained(folder, base=None)
    image, noise = random_image(16, 16), torch.randn(1, 4, 8, 8)
    assert torch.allclose(again(image, processing_res=RES, latents=noise).mask,
                          tiny_pipeline(image, processing_res=RES, latents=noise).mask, atol=1e-6)
