"""The first thing to run on a GPU: one table that says whether DiffDIS is right and fast there (≤ 5 minutes).

Rows, on the chosen device against this machine's CPU in float32:
- parity: the tiny parity fixture (tests/fixtures/official_tiny) and the full-size architecture (random
  weights), device float32 vs CPU float32, max abs difference of the mask;
- speed and memory: seconds per image (median of --repeats after a warm-up call) and peak device memory
  (``torch.cuda.max_memory_allocated``, weights included) for auto / bf16 / fp16, with and without
  ``torch.compile``, mask only and mask + edge, at --size;
- one Remove Background call through the ComfyUI nodes' own helpers (``cutout_masks``, the cutout
  refinements; no ComfyUI server): the pack is imported the way ComfyUI imports it.
The goal it measures: ≤ 0.08 s and ≤ 4 GB of device memory per 1024² mask-only image on an H100-class GPU.

    python benchmarks/gpu_check.py                     # on a CUDA machine: cuda vs cpu, 1024², full size
    python benchmarks/gpu_check.py --device cpu --tiny --size 64 --repeats 1 --compile off   # dry run
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = ROOT / "tests" / "fixtures" / "official_tiny"
GOAL_SECONDS, GOAL_GB, GOAL_SIZE = 0.08, 4.0, 1024


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def tiny_pipeline(device, dtype):
    from diffdis_core import DiffDISPipeline

    pipe = DiffDISPipeline.from_pretrained(TINY, base=None, torch_dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def master_pipeline(tiny: bool):
    """The float32 CPU pipeline every device copy is made from: the full-size architecture with random
    weights (benchmarks/inference.py), or with ``tiny`` the parity fixture."""
    import torch

    if tiny:
        return tiny_pipeline(torch.device("cpu"), torch.float32)
    from inference import build_pipeline

    return build_pipeline(torch.device("cpu"), torch.float32)


def on_device(master, device, dtype):
    pipe = copy.deepcopy(master).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_of(pipe, rgb, size: int, edge: bool = False):
    import torch

    out = pipe(rgb.to(pipe.device), processing_res=size, decode_edge=edge, output_size=False,
               generator=torch.Generator(pipe.device).manual_seed(0))
    return out.mask


def parity_row(name: str, master, device, rgb, size: int) -> dict:
    import torch

    pipe = on_device(master, device, torch.float32)
    # The same noise on both: drawn on the CPU and given as latents.
    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(rgb.to(device), processing_res=size, decode_edge=False, output_size=False,
                latents=noise.to(device)).mask.float().cpu()
    reference = master(rgb, processing_res=size, decode_edge=False, output_size=False, latents=noise).mask.float()
    difference = (ours - reference).abs().max().item()
    del pipe
    return {"check": f"parity: {name}, {device.type} fp32 vs cpu fp32 ({size}²)", "result": f"max abs {difference:.2e}",
            "ok": difference <= 1e-3}


def speed_row(master, device, dtype_name: str, compiled: bool, edge: bool, size: int, repeats: int) -> dict:
    import torch

    from diffdis_core.devices import pick_dtype

    dtype = pick_dtype(dtype_name, device)
    pipe = on_device(master, device, dtype)
    if compiled:
        pipe.compile()
    rgb = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    mask_of(pipe, rgb, size, edge)  # kernel selection, the allocator, compilation
    synchronize(device)
    first = time.perf_counter() - start
    reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mask_of(pipe, rgb, size, edge)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = peak_gb(device)
    row = {"check": f"{dtype_name} ({str(dtype).removeprefix('torch.')}){', compiled' if compiled else ''}, "
                    f"{'mask + edge' if edge else 'mask only'} ({size}²)",
           "seconds": seconds, "peak_gb": peak, "result": f"first call {first:.1f} s"}
    if device.type == "cuda" and size == GOAL_SIZE and not edge and peak is not None:
        row["ok"] = seconds <= GOAL_SECONDS and peak <= GOAL_GB
        row["result"] += f"; goal ≤ {GOAL_SECONDS} s and ≤ {GOAL_GB:g} GB: {'met' if row['ok'] else 'not met'}"
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def import_pack(name: str = "diffdis_gpu_check_pack"):
    """The node pack, imported the way ComfyUI imports custom nodes (spec from <folder>/__init__.py, any
    package name; the tests import it under names with spaces and slashes, as ComfyUI's folders have)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def remove_background_row(master, device, size: int) -> dict:
    """One Remove Background call through the nodes' helpers (mask, then the cutout refinements)."""
    import torch

    check = f"Remove Background through the nodes' helpers ({size}² model input, {2 * size}x{size} image)"
    try:
        pack = import_pack()
        models = sys.modules[pack.__name__ + ".nodes.models"]
        cutout = sys.modules[pack.__name__ + ".nodes.cutout"]
        refinement = sys.modules[pack.__name__ + ".nodes.refinement"]
        from diffdis_core.devices import pick_dtype

        pipe = on_device(master, torch.device("cpu"), pick_dtype("auto", device))
        model = models.DiffDISModel(pipe, "random", ROOT, device, torch.device("cpu"))
        image = torch.rand(1, size, 2 * size, 3, generator=torch.Generator().manual_seed(0))
        reset_peak(device)
        start = time.perf_counter()
        mask = cutout.cutout_masks(model, image, size, seed=0, refine_edges=True)
        colours, alpha = refinement.refine_cutouts(image.to(mask.device), mask, size, False, True,
                                                   device=model.load_device)
        synchronize(device)
        seconds = time.perf_counter() - start
        ran_on = model.pipeline.device.type
    except Exception as failure:  # report it in the table: the other rows still stand
        return {"check": check, "result": f"failed: {type(failure).__name__}: {str(failure).splitlines()[0][:120]}",
                "ok": False}
    shapes_ok = tuple(colours.shape) == (1, size, 2 * size, 3) and tuple(alpha.shape) == (1, size, 2 * size)
    finite = bool(torch.isfinite(colours).all() and torch.isfinite(alpha).all())
    return {"check": check, "seconds": seconds, "peak_gb": peak_gb(device),
            "result": f"ran on {ran_on}; cutout {list(colours.shape)}, alpha {list(alpha.shape)}",
            "ok": shapes_ok and finite and ran_on == device.type}


def print_row(row: dict) -> None:
    seconds = f"{row['seconds']:.3f}" if row.get("seconds") is not None else ""
    peak = f"{row['peak_gb']:.2f}" if row.get("peak_gb") is not None else ""
    ok = {True: "ok", False: "**FAIL**", None: ""}[row.get("ok")]
    print(f"| {row['check']} | {seconds} | {peak} | {row['result']} | {ok} |", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=GOAL_SIZE, help="processing size of the timed rows")
    parser.add_argument("--parity-size", type=int, default=256, help="processing size of the full-size parity row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["auto", "bf16", "fp16"], choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="rows without / with torch.compile")
    parser.add_argument("--tiny", action="store_true", help="the tiny fixture model everywhere (dry run)")
    args = parser.parse_args(argv)

    import torch

    from diffdis_core.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"DiffDIS GPU check on {name} ({device}); torch {torch.__version__}; "
          f"{'tiny fixture model' if args.tiny else 'full-size architecture, random weights'}\n")
    print("| check | s/image | peak GB | result | |")
    print("|---|---:|---:|---|---|")
    rows = []

    def emit(row):
        rows.append(row)
        print_row(row)

    tiny_size = 64
    tiny_master = tiny_pipeline(torch.device("cpu"), torch.float32)
    rgb = torch.rand(1, 3, tiny_size, tiny_size, generator=torch.Generator().manual_seed(0))
    emit(parity_row("tiny parity fixture", tiny_master, device, rgb, tiny_size))
    master = tiny_master if args.tiny else master_pipeline(tiny=False)
    parity_size = tiny_size if args.tiny else args.parity_size
    rgb = torch.rand(1, 3, parity_size, parity_size, generator=torch.Generator().manual_seed(1))
    emit(parity_row("tiny model again" if args.tiny else "full size, random weights", master, device, rgb, parity_size))

    # auto is one of the others: run it once, under its name.
    chosen = {}
    for dtype_name in args.dtypes:
        chosen.setdefault(pick_dtype(dtype_name, device), dtype_name)
    for dtype_name in chosen.values():
        for compiled in [c == "on" for c in args.compile]:
            for edge in (False, True):
                emit(speed_row(master, device, dtype_name, compiled, edge, args.size, args.repeats))
    emit(remove_background_row(master, device, args.size))
    failed = [row["check"] for row in rows if row.get("ok") is False]
    print(f"\n{len(rows)} rows; {'all checks ok' if not failed else 'not ok: ' + '; '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
