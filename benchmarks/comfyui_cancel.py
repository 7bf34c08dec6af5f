"""How long Cancel takes to stop a DiffDIS node, on the full-size architecture (random weights).

Runs the ComfyUI nodes in this process (no server: ComfyUI's Cancel is a flag that
``throw_exception_if_processing_interrupted`` turns into an exception, and that is what is stood in
for here). A batch of frames is encoded, then One-Step Segment (or the one-node Remove Background)
starts; ``--after`` seconds later Cancel is pressed, and the time until the node has stopped is the
latency. Give ``--pack`` another checkout of this project to measure an older version side by side:

    python benchmarks/comfyui_cancel.py --frames 16 --resolution 512
    git worktree add /tmp/before <commit> && python benchmarks/comfyui_cancel.py --pack /tmp/before
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Cancelled(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def import_pack(folder: Path):
    """The pack as ComfyUI imports it (its root __init__.py under a folder-path name)."""
    name = f"comfyui_pack_{abs(hash(str(folder)))}"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=HERE.parent, help="the project checkout whose nodes to time")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--after", type=float, default=5.0, help="seconds into the node when Cancel is pressed")
    parser.add_argument("--node", default="segment", choices=["segment", "remove_background"])
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(HERE))
    from inference import build_pipeline

    pack = import_pack(args.pack.resolve())
    services = sys.modules[pack.__name__ + ".nodes.services"]
    models = sys.modules[pack.__name__ + ".nodes.models"]
    nodes = pack.NODE_CLASS_MAPPINGS

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipeline = build_pipeline(torch.device("cpu"), dtype)
    model = models.DiffDISModel(pipeline, "random", Path("."), torch.device("cpu"), torch.device("cpu"))
    torch.manual_seed(0)
    frames = torch.rand(args.frames, args.resolution, args.resolution, 3)

    pressed = threading.Event()
    services.check_interrupted = lambda: (_ for _ in ()).throw(Cancelled()) if pressed.is_set() else None

    if args.node == "segment":
        encode = nodes["DiffDISEncodeCondition"]()
        (cond,) = encode.encode(model=model, image=frames, processing_res=args.resolution)

        def node():
            nodes["DiffDISOneStepSegment"]().segment(model=model, cond=cond, seed=0, ensemble=1, tta=False)
    else:
        def node():
            nodes["DiffDISRemoveBackground"]().remove_background(
                model=model, image=frames, processing_res=args.resolution, seed=0, tta=False, background="alpha",
                custom_color="#000000")

    timer = threading.Timer(args.after, lambda: (pressed.set(), setattr(timer, "at", time.perf_counter())))
    started = time.perf_counter()
    timer.start()
    try:
        node()
        outcome = "finished before Cancel"
    except Cancelled:
        outcome = "cancelled"
    ended = time.perf_counter()
    timer.cancel()
    latency = ended - getattr(timer, "at", ended)
    print(f"pack {args.pack}: {args.node}, {args.frames} frames at {args.resolution}², {args.dtype}, "
          f"{torch.get_num_threads()} threads; Cancel at {args.after:.1f} s -> {outcome} after "
          f"{ended - started:.1f} s; latency {latency:.2f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
