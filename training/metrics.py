"""DIS5K scores under the authors' protocol (their ``test_score.py``), computed with pysodmetrics.

Per image: the prediction is resized to its ground truth's size, min-max normalised and binarised at 0.5
(``binarize=False``, the ``--soft`` mode, keeps the soft map); the ground truth is divided by its maximum
and binarised at 0.5. Then, averaged over images:

- ``Fmax``: max over 256 thresholds of the mean F-measure curve (β² = 0.3), over images whose ground
  truth is not empty (as the authors; pysodmetrics alone would count blank ground truths as F = 0);
- ``Fw``: weighted F-measure (β = 1); ``Sm``: S-measure (α = 0.5); ``MAE``;
- ``Em``: adaptive E-measure (threshold 2 × mean) on binarised maps, the mean E-measure over thresholds
  in soft mode;
- ``HCE``: human correction effort (pysodmetrics' port of the DIS authors' measure).

Results of several shards (processes) combine exactly: each keeps sums and counts (``partial``).
"""

from __future__ import annotations

import math

import numpy as np
import py_sod_metrics as sod
from PIL import Image

METRIC_KEYS = ("Fmax", "Fw", "Em", "Sm", "MAE", "HCE")


def to_unit_float(array: np.ndarray) -> np.ndarray:
    """A map as float64 in [0, 1] (uint8 / 255, uint16 / 65535, floats clipped)."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., :3].mean(axis=-1) if array.shape[-1] in (3, 4) else array[..., 0]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype in (np.uint16, np.int32, np.int64, np.uint32):
        return array.astype(np.float64) / 65535.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def binarize_ground_truth(gt: np.ndarray) -> np.ndarray:
    """The authors: gt / (max + 1e-8) > 0.5 (so any mask scale works; a blank mask stays blank)."""
    gt = np.asarray(gt, dtype=np.float64)
    if gt.ndim == 3:
        gt = gt[..., 0]
    return gt / (gt.max() + 1e-8) > 0.5


def prepare_prediction(pred: np.ndarray, size: tuple[int, int], binarize: bool = True) -> np.ndarray:
    """Resize to ``size`` (H, W) with PIL bicubic (PIL's default, as the authors' ``resize``), min-max
    normalise (a constant map keeps its level), and binarise at 0.5 unless ``binarize`` is False."""
    pred = np.asarray(pred)
    if pred.dtype != np.uint8 or pred.ndim != 2:
        pred = to_unit_float(pred)
    if pred.shape != tuple(size):
        # 8-bit maps are resized as 8-bit images, exactly as the authors' script; others as float images.
        image = Image.fromarray(pred) if pred.dtype == np.uint8 else Image.fromarray(pred.astype(np.float32), "F")
        pred = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC))
    pred = to_unit_float(pred)
    low, high = pred.min(), pred.max()
    pred = (pred - low) / (high - low) if high > low else pred
    return (pred > 0.5).astype(np.float64) if binarize else pred


class DISMetrics:
    """Accumulates the paper's five metrics (and HCE) over images."""

    def __init__(self, binarize: bool = True, hce: bool = True):
        self.binarize = binarize
        self.fm = sod.FmeasureV2({"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)})
        self.wfm = sod.WeightedFmeasure(beta=1)
        self.em = sod.Emeasure()
        self.sm = sod.Smeasure(alpha=0.5)
        self.mae = sod.MAE()
        self.hce = sod.HumanCorrectionEffortMeasure(relax=5, epsilon=2.0) if hce else None
        self.count = 0
        self.count_with_foreground = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """``pred``: a soft map (float in [0, 1], uint8 or uint16) of any size; ``gt``: the ground-truth mask."""
        gt = binarize_ground_truth(gt)
        pred = prepare_prediction(pred, gt.shape, self.binarize)
        if gt.any():  # the authors' F curve skips blank ground truths
            self.fm.step(pred, gt, normalize=False)
            self.count_with_foreground += 1
        self.wfm.step(pred, gt, normalize=False)
        self.em.step(pred, gt, normalize=False)
        self.sm.step(pred, gt, normalize=False)
        self.mae.step(pred, gt, normalize=False)
        if self.hce is not None:
            self.hce.step(pred, gt, normalize=False)
        self.count += 1

    def partial(self) -> dict:
        """Sums and counts, to combine shards exactly (``combine``)."""
        if self.count == 0:
            return {"count": 0, "count_with_foreground": 0, "soft": not self.binarize}
        em = self.em.get_results()["em"]
        out = {
            "count": self.count,
            "count_with_foreground": self.count_with_foreground,
            "soft": not self.binarize,
            "Fw": float(self.wfm.get_results()["wfm"]) * self.count,
            "Em": float(em["adp"] if self.binarize else np.mean(em["curve"])) * self.count,
            "Sm": float(self.sm.get_results()["sm"]) * self.count,
            "MAE": float(self.mae.get_results()["mae"]) * self.count,
        }
        if self.count_with_foreground:
            curve = np.asarray(self.fm.get_results()["fm"]["dynamic"], dtype=np.float64)
            out["fm_curve"] = (curve * self.count_with_foreground).tolist()
        if self.hce is not None:
            out["HCE"] = float(self.hce.get_results()["hce"]) * self.count
        return out

    def results(self) -> dict:
        return combine([self.partial()])


def combine(partials: list[dict]) -> dict:
    """Final figures from the partial sums of one or more shards."""
    count = sum(p["count"] for p in partials)
    with_fg = sum(p["count_with_foreground"] for p in partials)
    out: dict = {"images": count}
    if with_fg:
        curve = np.sum([p["fm_curve"] for p in partials if p["count_with_foreground"]], axis=0) / with_fg
        out["Fmax"] = float(curve.max())
    else:
        out["Fmax"] = math.nan  # no image with foreground: F-measure is undefined
    for key in ("Fw", "Em", "Sm", "MAE", "HCE"):
        if count and all(key in p for p in partials if p["count"]):
            out[key] = sum(p.get(key, 0.0) for p in partials) / count
        elif key != "HCE":
            out[key] = math.nan
    return out


def mean_over_splits(results: dict[str, dict], splits: list[str]) -> dict:
    """The paper's "DIS-TE (1-4)" row: the plain mean of the per-split figures."""
    out = {"images": sum(results[s]["images"] for s in splits)}
    for key in METRIC_KEYS:
        if all(key in results[s] for s in splits):
            out[key] = float(np.mean([results[s][key] for s in splits]))
    return out


def format_table(results: dict[str, dict], soft: bool = False) -> str:
    """A Markdown table in the paper's layout (Table 2), three decimals; HCE as an integer."""
    em_name = "mean Eφ" if soft else "Eφm"
    show_hce = any("HCE" in r for r in results.values())
    header = ["set", "Fβmax", "Fβw", em_name, "Sm", "MAE"] + (["HCE"] if show_hce else []) + ["images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [name] + [_fmt(r.get(k)) for k in ("Fmax", "Fw", "Em", "Sm", "MAE")]
        if show_hce:
            cells.append("-" if r.get("HCE") is None else f"{r['HCE']:.0f}")
        cells.append(str(r.get("images", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"
