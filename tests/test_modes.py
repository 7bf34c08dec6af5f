"""The authors' other modes on the official_tiny_modes fixture (see its README): test-time augmentation
and ensembling, computed by their own code (ttach TTA, their pipeline and utils/depth_ensemble.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffdis_core import DiffDISError
from diffdis_core.ensemble import align_draws, alignment_objective, ensemble_maps


@pytest.fixture(scope="module")
def case(official_tiny_modes):
    return json.loads((official_tiny_modes / "case.json").read_text())


@pytest.fixture(scope="module")
def noises(official_tiny_modes):
    return load_file(official_tiny_modes / "noises.safetensors")


@pytest.fixture(scope="module")
def expected(official_tiny_modes):
    return load_file(official_tiny_modes / "expected.safetensors")


@pytest.fixture(scope="module")
def square_image(official_tiny_modes):
    return Image.open(official_tiny_modes / "image_at_processing_res.png").convert("RGB")


def max_error(actual, expected):
    assert actual.shape == expected.shape
    return (actual.float() - expected.float()).abs().max().item()


def test_tta_views_are_the_authors(tiny_pipeline, case):
    assert tiny_pipeline.tta_views == [tuple(view) for view in case["tta_views_in_ttach_order"]]


def test_tta_reproduces_the_authors_maps(tiny_pipeline, case, noises, expected, square_image):
    views = [noises[f"tta_{int(flip)}_{scale}"] for flip, scale in tiny_pipeline.tta_views]
    out = tiny_pipeline(square_image, processing_res=case["processing_res"], tta=True, latents=views,
                        output_size=False)
    assert max_error(out.mask[0, 0], expected["tta_mask_square"]) <= 1e-4
    assert max_error(out.edge[0, 0], expected["tta_edge_square"]) <= 1e-4


@pytest.fixture(scope="module")
def ensemble_latents(tiny_pipeline, case, noises, square_image):
    condition = tiny_pipeline.encode_condition(square_image, case["processing_res"])
    draws = [noises[f"ensemble_{k}"] for k in range(case["ensemble_draws"])]
    return tiny_pipeline.segment(condition, latents=draws, ensemble_size=len(draws))


@pytest.mark.parametrize("kind", ["mask", "edge"])
def test_each_ensemble_draw_is_the_authors(tiny_pipeline, ensemble_latents, expected, kind):
    latents = getattr(ensemble_latents.views[0], f"{kind}_latents")
    maps = tiny_pipeline.decode_maps(latents.flatten(0, 1))[:, 0]
    assert max_error(maps, expected[f"ensemble_draws_{kind}"]) <= 1e-4


def their_objective(draws: torch.Tensor) -> float:
    """The value their solver reaches: BFGS, 2 iterations, tol 1e-3, on a float32 objective with
    finite-difference gradients (scipy's default), written after their utils/depth_ensemble.py."""
    from scipy.optimize import minimize

    count = draws.shape[0]
    flat = draws.reshape(count, -1).float()
    low, high = flat.min(dim=1).values.numpy(), flat.max(dim=1).values.numpy()
    scale = 1 / (high - low)

    def cost(x):
        s, t = torch.from_numpy(x[:count]).float(), torch.from_numpy(x[count:]).float()
        return np.float32(alignment_objective(flat, s, t).item())

    x = minimize(cost, np.concatenate([scale, -scale * low]).astype(np.float32), method="BFGS", tol=1e-3,
                 options={"maxiter": 2}).x
    return alignment_objective(flat.double(), torch.from_numpy(x[:count]).double(),
                               torch.from_numpy(x[count:]).double()).item()


@pytest.mark.parametrize("kind", ["mask", "edge"])
def test_ensembling_follows_the_authors_method(tiny_pipeline, ensemble_latents, expected, kind):
    out = tiny_pipeline.decode(ensemble_latents, output_size=False)
    ours = getattr(out, kind)[0, 0]
    # Their solver is unstable (float32, finite differences): compare by method and objective.
    assert max_error(ours, expected[f"ensemble_{kind}_square"]) <= 0.1
    draws = expected[f"ensemble_draws_{kind}"]
    scale, shift = align_draws(draws)
    ours_cost = alignment_objective(draws.reshape(3, -1).double(), torch.from_numpy(scale),
                                    torch.from_numpy(shift)).item()
    assert ours_cost <= their_objective(draws)
    # The plain mean is another method, far from theirs: the comparison above has teeth.
    mean = tiny_pipeline.decode(ensemble_latents, output_size=False, ensemble_reduction="mean")
    assert max_error(getattr(mean, kind)[0, 0], expected[f"ensemble_{kind}_square"]) > 0.2


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ensembling_is_the_same_on_any_thread_count(expected, threads):
    draws = expected["ensemble_draws_mask"]
    reference = ensemble_maps(draws)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = ensemble_maps(draws)
    finally:
        torch.set_num_threads(previous)
    assert max_error(again, reference) <= 1e-6


def test_draws_differing_by_scale_and_shift_ensemble_to_the_minmaxed_draw(expected):
    draw = expected["ensemble_draws_mask"][0]
    draws = torch.stack([draw, 0.5 * draw + 0.2, 0.8 * draw + 0.05, 0.3 * draw + 0.6])
    minmaxed = (draw - draw.min()) / (draw.max() - draw.min())
    assert max_error(ensemble_maps(draws), minmaxed) <= 1e-5
    assert max_error(ensemble_maps(torch.stack([draw] * 3)), minmaxed) <= 1e-5


def test_tta_and_ensemble_replay_exactly_from_a_noise_list(tiny_pipeline, square_image):
    options = dict(processing_res=256, tta=True, ensemble_size=2, ensemble_reduction="mean", decode_edge=False)
    seeded = tiny_pipeline(square_image, generator=torch.Generator().manual_seed(5), **options).mask
    # The same draws as a list: views in tta_views order, draws inner.
    generator = torch.Generator().manual_seed(5)
    noises = [torch.randn(1, 4, int(256 * scale) // 8, int(256 * scale) // 8, generator=generator)
              for _, scale in tiny_pipeline.tta_views for _ in range(2)]
    assert torch.equal(tiny_pipeline(square_image, latents=noises, **options).mask, seeded)
    swapped = noises[2:4] + noises[:2] + noises[4:]
    with pytest.raises(DiffDISError, match=r"latents\[0\] must have shape \[1, 4, 24, 24\] for this input, "
                                           r"got \[1, 4, 32, 32\]"):
        tiny_pipeline(square_image, latents=swapped, **options)
    with pytest.raises(DiffDISError, match="one noise per view and draw"):
        tiny_pipeline(square_image, latents=noises[:-1], **options)
