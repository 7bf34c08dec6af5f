"""Cutout colours and edges (diffdis_core.matting) on synthetic composites with a known answer."""

import pytest
import torch
from tolerances import assert_close_across_kernels
import torch.nn.functional as F

from benchmarks.synthetic_composites import alpha_errors, edge_band, foreground_error, make_composite
from diffdis_core import DiffDISError, cutout_rgba, estimate_foreground, image_io, matting, refine_alpha

ACCELERATORS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no MPS")),
]


@pytest.fixture(scope="module")
def composite():
    return make_composite(120, 160, seed=1, noise=0.005)


@pytest.fixture(scope="module")
def similar():
    return make_composite(120, 160, seed=2, palette="similar", noise=0.005)


def shrink(alpha, size):
    return F.interpolate(alpha, size=size, mode="bilinear", align_corners=False, antialias=True)


def enlarge(alpha, size):
    return F.interpolate(alpha, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("case, bound", [("composite", 0.25), ("similar", 0.6)])
def test_foreground_takes_the_old_background_out_of_soft_edges(case, bound, request):
    c = request.getfixturevalue(case)
    before = foreground_error(c["image"], c["foreground"], c["alpha"])
    after = foreground_error(estimate_foreground(c["image"], c["alpha"]), c["foreground"], c["alpha"])
    assert after < bound * before  # measured: 0.14 and 0.45 (similar colours leave less to take out)


@pytest.mark.parametrize("case", ["composite", "similar"])
def test_foreground_is_as_accurate_as_pymatting(case, request):
    pymatting = pytest.importorskip("pymatting")
    c = request.getfixturevalue(case)
    reference = pymatting.estimate_foreground_ml(c["image"][0].permute(1, 2, 0).contiguous().numpy(),
                                                 c["alpha"][0, 0].contiguous().numpy())
    reference = torch.from_numpy(reference).float().permute(2, 0, 1)[None]
    ours = foreground_error(estimate_foreground(c["image"], c["alpha"]), c["foreground"], c["alpha"])
    assert ours <= 1.05 * foreground_error(reference, c["foreground"], c["alpha"])


def test_foreground_keeps_opaque_pixels_and_handles_constant_alpha(composite):
    image = composite["image"]
    alpha = composite["alpha"]
    result = estimate_foreground(image, alpha)
    opaque = (alpha == 1).expand_as(image)
    assert opaque.any() and torch.equal(result[opaque], image[opaque])
    assert torch.equal(estimate_foreground(image, torch.ones_like(alpha)), image)
    transparent = estimate_foreground(image, torch.zeros_like(alpha))
    assert transparent.shape == image.shape and torch.isfinite(transparent).all()
    assert transparent.min() >= 0 and transparent.max() <= 1


def test_foreground_batch_dtypes_and_odd_sizes(composite, similar):
    images = torch.cat([composite["image"], similar["image"]])
    alphas = torch.cat([composite["alpha"], similar["alpha"]])
    batched = estimate_foreground(images, alphas)
    assert batched.shape == images.shape and batched.dtype == torch.float32
    for i in range(2):  # each image is estimated on its own
        torch.testing.assert_close(batched[i:i + 1], estimate_foreground(images[i:i + 1], alphas[i:i + 1]))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        result = estimate_foreground(images.to(dtype), alphas.to(dtype))
        assert result.dtype == dtype
        torch.testing.assert_close(result.float(), batched, atol=2e-2, rtol=0)
    for size in ((1, 1), (1, 7), (5, 3)):
        tiny = torch.rand(1, 3, *size)
        assert estimate_foreground(tiny, torch.full((1, 1, *size), 0.5)).shape == tiny.shape


def test_foreground_tiles_give_the_whole_level_result(monkeypatch):
    """Large levels are relaxed tile by tile; where every tile needs it, the result is the whole-level one."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 150, 230, generator=generator)
    alpha = torch.rand(1, 1, 150, 230, generator=generator)
    monkeypatch.setattr(matting, "_TILE", 32)
    monkeypatch.setattr(matting, "_RUN_TILES", 3)
    tiled = estimate_foreground(image, alpha)
    monkeypatch.setattr(matting, "_TILE", 1024)
    assert_close_across_kernels(tiled, estimate_foreground(image, alpha))


def test_foreground_of_large_images_is_solved_channel_by_channel_with_the_same_result(composite, monkeypatch):
    """Above a size the colour channels are solved one at a time (less memory): the same colours."""
    image, alpha = composite["image"], composite["alpha"]
    together = estimate_foreground(image, alpha)
    calls = []
    solve = matting._solve_levels
    monkeypatch.setattr(matting, "_solve_levels", lambda part, a, out: calls.append(part.shape[1]) or solve(part, a, out))
    monkeypatch.setattr(matting, "_CHANNELWISE_PIXELS", image.shape[-2] * image.shape[-1])
    assert_close_across_kernels(estimate_foreground(image, alpha), together)
    assert calls == [1, 1, 1]


def test_foreground_in_bands_is_the_whole_image_result(composite, monkeypatch):
    """The full size is relaxed in bands of rows with a halo: exactly the colours of one band (whole-image
    sweeps), for float and (rounded) uint8 images, with bands that cut through soft edges and tiles."""
    image, alpha = composite["image"], composite["alpha"]
    monkeypatch.setattr(matting, "_TILE", 16)
    whole = estimate_foreground(image, alpha)
    eight_bit = (image * 255).round().to(torch.uint8)
    whole8 = estimate_foreground(eight_bit.float() / 255, alpha)
    bands = []
    relax = matting._relax_level
    monkeypatch.setattr(matting, "_relax_level", lambda i, a, b, s: bands.append(i.shape[-2]) or relax(i, a, b, s))
    monkeypatch.setattr(matting, "_BAND_PIXELS", 16 * image.shape[-1])  # 16-row bands (+ a 16-row halo)
    banded = estimate_foreground(image, alpha)
    assert bands[-8:] == [32] + [48] * 5 + [40, 24]  # the full size of 120 rows: 8 bands, halos clipped at the ends
    torch.testing.assert_close(banded, whole, atol=1e-6, rtol=0)
    banded8 = estimate_foreground(eight_bit, alpha)
    assert banded8.dtype == torch.uint8
    assert ((whole8 * 255).round() - banded8.float()).abs().max() == 0


def test_refine_alpha_in_bands_is_the_whole_image_result(composite, monkeypatch):
    """Large (or uint8) images are refined in bands: the whole-image mask up to float rounding."""
    image, alpha = composite["image"], composite["alpha"]
    small = shrink(alpha, (60, 80))
    whole = refine_alpha(image, small)
    monkeypatch.setattr(matting, "_BAND_PIXELS", 1)
    monkeypatch.setattr(image_io, "BAND_ELEMENTS", 6 * 200)  # bands of a few rows or columns
    torch.testing.assert_close(refine_alpha(image, small), whole, atol=1e-5, rtol=0)
    eight_bit = (image * 255).round().to(torch.uint8)
    refined8 = refine_alpha(eight_bit, small)
    assert refined8.dtype == torch.float32
    torch.testing.assert_close(refined8, refine_alpha(eight_bit.float() / 255, small), atol=1e-5, rtol=0)


@pytest.mark.parametrize("palette", ["contrasting", "similar"])
def test_refined_edges_beat_bilinear(palette):
    big = make_composite(360, 480, seed=3, palette=palette, noise=0.005)
    truth = big["alpha"]
    small = shrink(truth, (120, 160))
    band = edge_band(truth, 3)
    bilinear_band, bilinear_whole = alpha_errors(enlarge(small, truth.shape[-2:]), truth, band)
    refined = refine_alpha(big["image"], small)
    assert refined.shape == truth.shape and refined.min() >= 0 and refined.max() <= 1
    refined_band, refined_whole = alpha_errors(refined, truth, band)
    assert refined_band < 0.7 * bilinear_band  # measured: 0.15 and 0.45
    assert refined_whole <= bilinear_whole
    # A mask already enlarged to the image's size (a ComfyUI MASK) is refined from the size it was predicted at.
    enlarged = enlarge(small, truth.shape[-2:])
    again_band, again_whole = alpha_errors(refine_alpha(big["image"], enlarged, predicted_at=(120, 160)), truth, band)
    assert again_band < 0.8 * bilinear_band and again_whole <= bilinear_whole


def test_refine_alpha_sizes_batch_and_dtypes(composite):
    image = torch.cat([composite["image"]] * 2)
    small = shrink(torch.cat([composite["alpha"], 1 - composite["alpha"]]), (40, 50))
    refined = refine_alpha(image, small)
    assert refined.shape == (2, 1, 120, 160)
    torch.testing.assert_close(refined[1:], refine_alpha(image[1:], small[1:]))
    half = refine_alpha(image.half(), small.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), refined, atol=1e-2, rtol=0)
    # Nothing to recover from a mask at least the image's size: it is only resized.
    torch.testing.assert_close(refine_alpha(image, composite["alpha"].expand(2, -1, -1, -1)),
                               composite["alpha"].expand(2, -1, -1, -1))
    larger = torch.rand(2, 1, 130, 170)
    torch.testing.assert_close(refine_alpha(image, larger), shrink(larger, (120, 160)))


def test_cutout_rgba_options(composite):
    image, alpha = composite["image"], composite["alpha"]
    small = shrink(alpha, (60, 80))
    rgb, out_alpha = cutout_rgba(image, small, refine_foreground=False, refine_edges=False)
    assert torch.equal(rgb, image)
    torch.testing.assert_close(out_alpha, enlarge(small, (120, 160)).clamp(0, 1))
    rgb, out_alpha = cutout_rgba(image, small)
    torch.testing.assert_close(out_alpha, refine_alpha(image, small))
    torch.testing.assert_close(rgb, estimate_foreground(image, out_alpha))
    # Straight alpha: the decontaminated colours are not multiplied by alpha.
    soft = (out_alpha > 0.2) & (out_alpha < 0.8)
    assert (rgb * out_alpha)[soft.expand_as(rgb)].mean() < rgb[soft.expand_as(rgb)].mean()


@pytest.mark.parametrize("call, image, alpha, words", [
    (estimate_foreground, torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 9), "alpha must have the image's size"),
    (estimate_foreground, torch.rand(3, 8, 8), torch.rand(1, 8, 8), "image must be [B, 3, H, W]"),
    (estimate_foreground, torch.rand(1, 4, 8, 8), torch.rand(1, 1, 8, 8), "image must be [B, 3, H, W]"),
    (refine_alpha, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4), "alpha must be [B, 1, H, W]"),
    (refine_alpha, torch.rand(2, 3, 8, 8), torch.rand(1, 1, 4, 4), "batches differ"),
    (cutout_rgba, torch.rand(1, 3, 8, 8), torch.randint(0, 255, (1, 1, 8, 8), dtype=torch.uint8), "mask must be a"),
    (cutout_rgba, torch.rand(1, 3, 0, 8), torch.rand(1, 1, 4, 4), "image must be [B, 3, H, W]"),
])
def test_bad_inputs_are_named(call, image, alpha, words):
    with pytest.raises(DiffDISError, match=r"\b" + call.__name__ + ": .*" + words.replace("[", r"\[")):
        call(image, alpha)


@pytest.mark.parametrize("device", ACCELERATORS)
def test_accelerators_match_the_cpu(device, composite):
    image, alpha, truth = composite["image"], composite["alpha"], composite["foreground"]
    small = shrink(alpha, (60, 80))
    refined = refine_alpha(image.to(device), small.to(device))
    assert refined.device.type == device
    torch.testing.assert_close(refined.cpu(), refine_alpha(image, small), atol=1e-4, rtol=0)
    # Accelerators relax larger tiles (skipping less), so the colours differ slightly where alpha is 0.
    foreground = estimate_foreground(image.to(device).half(), alpha.to(device).half())
    assert foreground.device.type == device and foreground.dtype == torch.float16
    cpu_error = foreground_error(estimate_foreground(image, alpha), truth, alpha)
    assert foreground_error(foreground.float().cpu(), truth, alpha) == pytest.approx(cpu_error, rel=0.03)


@pytest.mark.parametrize("refine_edges, refine_foreground", [(True, True), (False, True), (True, False), (False, False)])
def test_the_8_bit_cutout_is_the_float_cutout_rounded(composite, refine_edges, refine_foreground):
    """as_uint8 (the command line's memory strategy) changes the memory, not the cutout: the float results
    to the 8-bit rounding; a uint8 image's colours come back as they are when not estimated (no copy)."""
    eight_bit = (composite["image"] * 255).round().to(torch.uint8)
    small = shrink(composite["alpha"], (60, 80))
    options = {"refine_edges": refine_edges, "refine_foreground": refine_foreground}
    rgb, alpha = cutout_rgba(eight_bit.float() / 255, small, **options)
    rgb8, alpha8 = cutout_rgba(eight_bit, small, as_uint8=True, **options)
    assert rgb8.dtype == alpha8.dtype == torch.uint8 and alpha8.shape == alpha.shape
    assert ((rgb * 255).round() - rgb8.float()).abs().max() <= 1
    assert ((alpha * 255).round() - alpha8.float()).abs().max() <= 1
    if not refine_foreground:
        assert rgb8 is eight_bit


def test_foreground_over_the_image_itself_is_the_same(composite, monkeypatch):
    """in_place (the command line's memory saving): colours written over the uint8 image, in bands whose
    halos overlap the rows already finished, equal the separate result; large levels in bands too."""
    image, alpha = composite["image"], composite["alpha"]
    eight_bit = (image * 255).round().to(torch.uint8)
    monkeypatch.setattr(matting, "_TILE", 16)
    separate = estimate_foreground(eight_bit, alpha)
    monkeypatch.setattr(matting, "_BAND_PIXELS", 16 * image.shape[-1])  # the full size and the next level in bands
    monkeypatch.setattr(matting, "_CHANNELWISE_PIXELS", 1)
    levels = []
    relax_in_bands = matting._relax_in_bands
    monkeypatch.setattr(matting, "_relax_in_bands", lambda i, a, p, size, s, e: levels.append(size) or
                        relax_in_bands(i, a, p, size, s, e))
    target = eight_bit.clone()
    result = estimate_foreground(target, alpha, in_place=True)
    assert result is target and len(levels) > 3  # per channel: the full size and at least one level below
    assert torch.equal(target, separate)
    with pytest.raises(DiffDISError, match="in_place needs a uint8 image"):
        estimate_foreground(image, alpha, in_place=True)
