"""The paper's metrics under the authors' protocol, on hand-made cases with known values."""

import math

import numpy as np
import pytest

from training.metrics import DISMetrics, combine, format_table, mean_over_splits, prepare_prediction

H, W = 40, 50
N = H * W


def square_gt():
    gt = np.zeros((H, W), np.uint8)
    gt[10:30, 15:35] = 255  # 400 px of 2000: u = 0.2, centred
    return gt


def scores(pairs, **kwargs):
    metrics = DISMetrics(**kwargs)
    for pred, gt in pairs:
        metrics.update(pred, gt)
    return metrics.results()


def test_perfect_prediction():
    gt = square_gt()
    r = scores([(gt.astype(np.float32) / 255, gt)])
    assert r["Fmax"] == pytest.approx(1) and r["Fw"] == pytest.approx(1, abs=1e-6)
    assert r["Sm"] == pytest.approx(1) and r["MAE"] == 0 and r["HCE"] == 0
    assert r["Em"] == pytest.approx(N / (N - 1))  # E-measure divides by N - 1


def test_empty_prediction():
    gt = square_gt()
    u = 0.2
    r = scores([(np.zeros((H, W)), gt)])
    assert r["MAE"] == pytest.approx(u) and r["Fw"] == 0
    # The 256-threshold curve includes ">= 0" (everything foreground): F = 1.3u / (0.3u + 1) there.
    assert r["Fmax"] == pytest.approx(1.3 * u / (0.3 * u + 1))
    # Adaptive threshold 2 x mean = 0 marks every pixel foreground: alignment 0, enhanced 1/4 everywhere.
    assert r["Em"] == pytest.approx(0.25 * N / (N - 1))
    # Object score: background part only, (1 - u) * 1; region score 0 (every quadrant mixes fg and bg).
    assert r["Sm"] == pytest.approx(0.5 * (1 - u))


def test_blank_ground_truth():
    blank = np.zeros((H, W), np.uint8)
    r = scores([(np.zeros((H, W)), blank)])
    assert math.isnan(r["Fmax"])  # no image with foreground: excluded from the F curve
    assert r["MAE"] == 0 and r["Sm"] == 1 and r["Fw"] == 0 and r["HCE"] == 0
    assert r["Em"] == 0  # the adaptive threshold 0 marks all pixels foreground (same in the authors' code)
    noisy = np.zeros((H, W))
    noisy[:4, :] = 1.0  # 200 false-positive pixels
    r = scores([(noisy, blank)])
    assert r["MAE"] == pytest.approx(0.1) and r["Sm"] == pytest.approx(0.9)
    assert r["Em"] == pytest.approx((N - 200) / (N - 1))


def test_full_ground_truth_and_blank_images_stay_out_of_fmax():
    full = np.full((H, W), 255, np.uint8)
    r = scores([(np.ones((H, W)), full)])
    assert r["Sm"] == 1 and r["MAE"] == 0 and r["Fmax"] == pytest.approx(1)
    assert r["Em"] == pytest.approx(N / (N - 1))
    gt = square_gt()
    with_blank = scores([(gt.astype(float) / 255, gt), (np.zeros((H, W)), np.zeros((H, W), np.uint8))])
    assert with_blank["Fmax"] == pytest.approx(1)  # the blank image does not pull the F curve down
    assert with_blank["MAE"] == 0 and with_blank["images"] == 2


def test_predictions_are_resized_min_max_normalised_and_binarised():
    gt = square_gt()
    soft = gt.astype(np.float64) / 255 * 0.4 + 0.3  # in [0.3, 0.7]: min-max makes it perfect
    assert scores([(soft, gt)])["MAE"] == 0
    small = np.asarray(gt[::2, ::2])  # half size, 8-bit
    assert prepare_prediction(small, (H, W)).shape == (H, W)
    assert scores([(small, gt)])["MAE"] <= 0.02  # at most a one-pixel shift of the outline
    sixteen = (gt.astype(np.uint16) * 257)
    assert scores([(sixteen, gt)]) == scores([(gt, gt)])
    # Ground truth scaled anyhow (here 0/1) is divided by its maximum first.
    assert scores([(gt, (gt > 0).astype(np.uint8))])["MAE"] == 0


def test_soft_mode_keeps_grey_levels():
    gt = square_gt()
    soft = gt.astype(np.float64) / 255 * 0.5 + 0.25
    soft[0, 0] = 0.0  # min-max then leaves the object at 0.75 and background at 0.25
    soft[0, 1] = 1.0
    binarised, graded = scores([(soft, gt)]), scores([(soft, gt)], binarize=False)
    assert binarised["MAE"] == pytest.approx(1 / N)
    assert graded["MAE"] == pytest.approx(0.25, abs=1e-3)


def test_shards_combine_to_the_single_run_figures():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(6):
        gt = (rng.random((H, W)) > 0.8).astype(np.uint8) * 255
        pairs.append((np.clip(gt / 255 + rng.normal(0, 0.4, (H, W)), 0, 1), gt))
    pairs.append((rng.random((H, W)), np.zeros((H, W), np.uint8)))
    whole = scores(pairs)
    shards = [DISMetrics(), DISMetrics()]
    for index, (pred, gt) in enumerate(pairs):
        shards[index % 2].update(pred, gt)
    split = combine([s.partial() for s in shards] + [DISMetrics().partial()])  # an empty shard too
    for key in ("Fmax", "Fw", "Em", "Sm", "MAE", "HCE"):
        assert split[key] == pytest.approx(whole[key], rel=1e-12)


def test_table_and_mean_row():
    results = {"DIS-TE1": {"Fmax": 0.9, "Fw": 0.8, "Em": 0.95, "Sm": 0.9, "MAE": 0.03, "images": 2},
               "DIS-TE2": {"Fmax": 0.8, "Fw": 0.7, "Em": 0.85, "Sm": 0.8, "MAE": 0.05, "images": 3}}
    mean = mean_over_splits(results, ["DIS-TE1", "DIS-TE2"])
    assert mean["Fmax"] == pytest.approx(0.85) and mean["images"] == 5
    table = format_table({**results, "mean": mean})
    assert "| DIS-TE1 | 0.900 | 0.800 | 0.950 | 0.900 | 0.030 | 2 |" in table
    assert "| mean | 0.850 |" in table
