"""Cutout quality and speed on synthetic composites with a known answer (benchmarks/synthetic_composites.py).

1. Foreground colours under a soft alpha (colour decontamination), given the true alpha:
   none (the image's own pixels), blur fusion (BiRefNet's two box-blur passes, r = 90 and 6),
   pymatting's estimate_foreground_ml (Germer et al.'s multi-level method, numba, CPU) when installed,
   and diffdis_core.matting.estimate_foreground. Error: mean colour error where alpha is soft, weighted by
   alpha (what shows of the foreground).
2. Masks predicted at 1024x1024 brought to the image's size: bilinear (what the pipeline does) against
   diffdis_core.matting.refine_alpha. Error: mean |alpha - truth| in the edge band (within the enlargement
   factor of a soft pixel or an edge of the true matte) and over the whole image. The 1024x1024 mask is
   the truth shrunk (antialiased), and, closer to a network's output, the same a little softened.

Seconds are the best of --repeats runs, wall clock, on this process's threads. Every method runs on the
CPU; ours also on CUDA when present.

    python benchmarks/cutout.py                     # 1 and 6 megapixels
    python benchmarks/cutout.py --sizes 864x1152 --repeats 1
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffdis_core.matting import estimate_foreground, refine_alpha  # noqa: E402
from synthetic_composites import alpha_errors, edge_band, foreground_error, make_composite  # noqa: E402

MASK_SIZE = (1024, 1024)  # the processing size: DiffDIS predicts the mask at 1024x1024 whatever the aspect
NOISE = 0.005  # a camera's noise on the composite (about 1.3 levels of 255)


def box_blur(x: torch.Tensor, side: int) -> torch.Tensor:
    """Mean over a side x side window clipped at the borders (cv2.blur up to the border rule), by
    cumulative sums: O(1) per pixel whatever the size, as cv2.blur."""
    radius = side // 2
    out = x
    for dim in (2, 3):
        size = out.shape[dim]
        sums = out.cumsum(dim)
        last = sums.narrow(dim, size - 1, 1)

        def repeated(tensor, times):
            shape = list(tensor.shape)
            shape[dim] = times
            return tensor.expand(shape)

        # padded[j] = x[0] + ... + x[j - radius - 1], so the window [i - r, i + r] is padded[i + 2r + 1] - padded[i]
        padded = torch.cat([repeated(torch.zeros_like(last), radius + 1), sums, repeated(last, radius)], dim)
        index = torch.arange(size, device=x.device)
        counts = ((index + radius).clamp(max=size - 1) - (index - radius).clamp(min=0) + 1).to(x.dtype)
        windows = padded.narrow(dim, 2 * radius + 1, size) - padded.narrow(dim, 0, size)
        out = windows / counts.view([size, 1] if dim == 2 else [size])
    return out


def blur_fusion(image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """BiRefNet's refine_foreground ("blur fusion", after Forte's approximate fast foreground estimation):
    a wide pass (box 90) for the local background, a narrow one (box 6) for the foreground."""
    def step(foreground, background, side):
        blurred_alpha = box_blur(alpha, side)
        blurred_f = box_blur(foreground * alpha, side) / (blurred_alpha + 1e-5)
        blurred_b = box_blur(background * (1 - alpha), side) / ((1 - blurred_alpha) + 1e-5)
        estimate = blurred_f + alpha * (image - alpha * blurred_f - (1 - alpha) * blurred_b)
        return estimate.clamp(0, 1), blurred_b

    foreground, background = step(image, image, 90)
    return step(foreground, background, 6)[0]


def pymatting_ml(image, alpha):
    """pymatting on HWC / HW float32 numpy arrays (converted outside the timing)."""
    from pymatting import estimate_foreground_ml

    return estimate_foreground_ml(image, alpha)


def to_numpy(image: torch.Tensor, alpha: torch.Tensor):
    return image[0].permute(1, 2, 0).contiguous().numpy(), alpha[0, 0].contiguous().numpy()


def from_numpy(foreground) -> torch.Tensor:
    return torch.from_numpy(foreground).float().permute(2, 0, 1)[None]


def timed(function, *args, repeats: int, device: torch.device):
    """(result, best seconds); one untimed warm-up run (numba compiles, CUDA initialises)."""
    result = function(*args)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def soften(mask: torch.Tensor) -> torch.Tensor:
    """A [1, 2, 1]^2 blur: a prediction's edges are a little softer than the truth's."""
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :])[None, None].to(mask)
    return F.conv2d(F.pad(mask, (1, 1, 1, 1), mode="replicate"), kernel)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["864x1152", "2000x3000"], help="HEIGHTxWIDTH of each case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice); 1 compares with pymatting's one thread")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # pymatting's resizes run on numba's threads
            import numba
            numba.set_num_threads(args.threads)
        except ImportError:
            pass
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    cpu = torch.device("cpu")
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    try:
        import pymatting  # noqa: F401
        have_pymatting = True
    except ImportError:
        have_pymatting = False
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}"
          + (f"; GPU: {torch.cuda.get_device_name()}" if cuda else "; no GPU"))

    def megapixels(size):
        return f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP)"

    cases = [("object, contrasting colours", dict(palette="contrasting")),
             ("object, similar colours", dict(palette="similar")),
             ("soft everywhere (fog)", dict(palette="similar", fog=True))]
    print("\n## Foreground colours (given the true alpha): error where alpha is soft, seconds\n")
    print("| case | method | " + " | ".join(megapixels(size) for size in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for label, options in cases:
        composites = [make_composite(*size, seed=args.seed, noise=NOISE, **options) for size in sizes]
        methods = [("none (the image's pixels)", None, cpu), ("blur fusion (r = 90, 6)", blur_fusion, cpu)]
        if have_pymatting:
            methods.append(("pymatting multi-level", pymatting_ml, cpu))
        methods.append(("**ours** (CPU)", estimate_foreground, cpu))
        if cuda:
            methods.append(("**ours** (CUDA)", estimate_foreground, cuda))
        for name, method, device in methods:
            cells = []
            for composite in composites:
                image, alpha = composite["image"].to(device), composite["alpha"].to(device)
                if method is None:
                    cells.append(f"{foreground_error(image, composite['foreground'].to(device), alpha):.4f}")
                    continue
                if method is pymatting_ml:
                    estimate, seconds = timed(method, *to_numpy(image, alpha), repeats=args.repeats, device=device)
                    estimate = from_numpy(estimate)
                else:
                    estimate, seconds = timed(method, image, alpha, repeats=args.repeats, device=device)
                error = foreground_error(estimate.cpu(), composite["foreground"], composite["alpha"])
                cells.append(f"{error:.4f}, {seconds:.2f} s")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)

    print(f"\n## Masks predicted at {MASK_SIZE[0]}x{MASK_SIZE[1]} brought to the image's size: "
          "error in the edge band / whole image, seconds\n")
    print("| case | mask | method | " + " | ".join(megapixels(size) for size in sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for label, options in cases[:2]:
        composites = [make_composite(*size, seed=args.seed, noise=NOISE, **options) for size in sizes]
        for mask_label, mask_model in (("the truth at 1024²", lambda m: m), ("softened", soften)):
            rows = {"bilinear": [], "**ours** (CPU)": []}
            if cuda:
                rows["**ours** (CUDA)"] = []
            for composite, size in zip(composites, sizes):
                truth = composite["alpha"]
                small = mask_model(F.interpolate(truth, size=MASK_SIZE, mode="bilinear", align_corners=False,
                                                 antialias=True)).clamp(0, 1)
                band = edge_band(truth, math.ceil(max(size[0] / MASK_SIZE[0], size[1] / MASK_SIZE[1])))
                bilinear = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
                base_band, base_whole = alpha_errors(bilinear, truth, band)
                rows["bilinear"].append(f"{base_band:.4f} / {base_whole:.5f}")
                for name, device in (("**ours** (CPU)", cpu), ("**ours** (CUDA)", cuda)):
                    if device is None:
                        continue
                    refined, seconds = timed(refine_alpha, composite["image"].to(device), small.to(device),
                                             repeats=args.repeats, device=device)
                    band_error, whole_error = alpha_errors(refined.cpu(), truth, band)
                    rows[name].append(f"{band_error:.4f} ({100 * (band_error / base_band - 1):+.0f} %) / "
                                      f"{whole_error:.5f} ({100 * (whole_error / base_whole - 1):+.0f} %), "
                                      f"{seconds:.2f} s")
            for name, cells in rows.items():
                print(f"| {label} | {mask_label} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
