"""Combining several noise draws of a map, as the authors do (their ``utils/depth_ensemble.py``,
Marigold's method): align each draw by a scale and a shift, take the per-pixel median, min-max it.

The alignment minimises, over per-draw scales s_i and shifts t_i (aligned draw a_i = s_i·d_i + t_i),

    sqrt(mean over draw pairs i<j and pixels of (a_i - a_j)²) + 0.02·(|min m| + |1 - max m|),

where m is the per-pixel median of the aligned draws (the lower middle value for an even count, as
``torch.median``), starting from each draw min-maxed, with BFGS for 2 iterations (gradient tolerance
1e-3), as they do. They evaluate it in float32 with finite-difference gradients, which makes their
result depend on the thread count; here it is evaluated in float64 on the CPU with exact gradients,
so the answer is the same on any machine and device. (Run to convergence this objective would
collapse every scale towards zero; the two iterations are part of the method.)
"""

from __future__ import annotations

import numpy as np
import torch

REGULARIZER_STRENGTH = 0.02
MAX_ITERATIONS = 2
TOLERANCE = 1e-3
ENSEMBLE_METHODS = ("median", "mean")


def alignment_objective(draws: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        regularizer_strength: float = REGULARIZER_STRENGTH) -> torch.Tensor:
    """The authors' alignment cost for draws ``[N, P]`` (flattened maps) aligned by ``scale``/``shift`` ``[N]``."""
    aligned = draws * scale[:, None] + shift[:, None]
    count = aligned.shape[0]
    pairs = count * (count - 1) // 2
    # Sum over pairs i<j of (a_i - a_j)² = N·Σ a_i² - (Σ a_i)², per pixel: no N² pair tensor.
    pair_sum = count * aligned.square().sum() - aligned.sum(dim=0).square().sum()
    mean_square = pair_sum / (pairs * aligned.shape[1])
    # sqrt has no gradient at 0 (draws already equal): use 0 there instead of NaN.
    distance = torch.where(mean_square > 0, mean_square, 1).sqrt() * (mean_square > 0)
    median = aligned.median(dim=0).values
    return distance + regularizer_strength * (median.min().abs() + (1 - median.max()).abs())


def align_draws(draws: torch.Tensor, regularizer_strength: float = REGULARIZER_STRENGTH,
                max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Per-draw (scale, shift) for draws ``[N, H, W]`` (or ``[N, P]``), by the authors' method."""
    from scipy.optimize import minimize

    # Gradients are needed even when called under torch.inference_mode (the pipeline's decode).
    with torch.inference_mode(False), torch.enable_grad():
        flat = draws.detach().reshape(draws.shape[0], -1).to("cpu", torch.float64).clone()
        count = flat.shape[0]
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        scale0 = 1.0 / (high - low).clamp_min(1e-12)
        start = torch.cat([scale0, -scale0 * low]).numpy()

        def cost_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray]:
            params = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
            cost = alignment_objective(flat, params[:count], params[count:], regularizer_strength)
            (gradient,) = torch.autograd.grad(cost, params)
            return float(cost.detach()), gradient.numpy()

        result = minimize(cost_and_gradient, start, jac=True, method="BFGS", tol=tolerance,
                          options={"maxiter": max_iterations})
    return result.x[:count], result.x[count:]


def ensemble_maps(draws: torch.Tensor, method: str = "median") -> torch.Tensor:
    """Draws ``[N, *shape]`` of one map (each in [0, 1]) -> one map ``[*shape]``.

    ``median``: the authors' aligned median, min-maxed to [0, 1]; ``mean``: the plain average.
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"ensemble method must be one of {ENSEMBLE_METHODS}, got {method!r}")
    if draws.shape[0] == 1:
        return draws[0]
    if method == "mean":
        return draws.mean(dim=0)
    scale, shift = align_draws(draws)
    view = (-1,) + (1,) * (draws.ndim - 1)
    # On the CPU in float64 like the solve (MPS has no float64; the draws of one map are small).
    aligned = draws.to("cpu", torch.float64) * torch.from_numpy(scale).view(view) + torch.from_numpy(shift).view(view)
    median = aligned.median(dim=0).values
    low, high = median.min(), median.max()
    return ((median - low) / (high - low).clamp_min(1e-12)).to(draws.device, draws.dtype)
