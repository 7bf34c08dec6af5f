"""Inference speed and peak memory of the full-size DiffDIS architecture (random weights), side by side
with the authors' sequence, in one run.

The authors' sequence is their `single_infer` + `decode` expressed with the same modules: float32 (their
only working precision: `--half_precision` is never applied), PyTorch's default memory layout, mask and
edge always decoded together, `DDPMScheduler.step`, their text encoder kept in memory. Ours is
`DiffDISPipeline.__call__` (what the command line and the ComfyUI nodes run), at `auto` and at each
precision, mask only and mask + edge.

Each configuration lives in its own worker process (so its peak memory is its own); the authors' worker
stays up, and each of our workers is timed in pairs with it, alternately (A, B, A, B, ...), so drift of
the machine hits both alike. Reported: median seconds per image, ratio of the medians, peak memory (RSS on
CPU, allocated VRAM on CUDA) over the timed runs. Then a memory table at larger sizes (one run each) and
how far `auto`'s mask is from float32's.

    python benchmarks/inference.py                                   # this machine's best device
    python benchmarks/inference.py --device cuda --resolutions 1024 --dtypes auto bf16 fp16 --compile
    python benchmarks/inference.py --resolutions 512 --dtypes auto fp32 --repeats 3 --memory-resolutions
    python benchmarks/inference.py --tables stages --stage-resolutions 1024 2048 --released-folder /tmp/diffdis-fp32

The stages table is what a user pays: a fresh process loads a folder in the released float32 layout
(written once from the random weights) with ``from_pretrained(torch_dtype=auto)``, then runs one image,
mask only, stage by stage (encode at 4 scales, the UNet, decode): per stage the peak resident memory
(VmHWM, reset before each stage), the seconds, the FLOPs counted with ``torch.utils.flop_counter`` (in a
separate pass) and the GFLOP/s achieved, as a share of what this machine's 3x3 convolution reaches in the
same process (128 channels at 512², channels-last, in the pipeline's precision and in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# stabilityai/sd-turbo vae/config.json (the SD 2.1 VAE)
SD_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True,
}
# stabilityai/sd-turbo text_encoder (OpenCLIP ViT-H/14 text tower), for the authors' resident memory
SD_TEXT_ENCODER_CONFIG = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
    "projection_dim": 512, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77,
}


# ------------------------------------------------------------------------------------------ in a worker
def build_pipeline(device, dtype):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler

    from diffdis_core import DiffDISPipeline, DiffDISUNet
    from diffdis_core.configs import SD_TURBO_SCHEDULER_CONFIG, SD_TURBO_UNET_CONFIG

    torch.manual_seed(0)
    unet = DiffDISUNet.from_config(SD_TURBO_UNET_CONFIG)
    with torch.no_grad():  # random weights of a realistic scale; the speed does not depend on values
        for conv in [*unet.rgb_proj, *unet.rgb_proj1]:
            conv.weight.normal_(0, 1e-3)
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG)
    scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER_CONFIG)
    pipe = DiffDISPipeline(unet, vae, scheduler, torch.randn(1, 2, 1024)).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def authors_inference(pipe, rgb):
    """The authors' single_infer + decode with the same modules: their operations, in their order."""
    import torch
    import torch.nn.functional as F

    def encode(x):
        h = pipe.vae.quant_conv(pipe.vae.encoder(x.to(pipe.vae_dtype)))
        return (h.chunk(2, dim=1)[0] * 0.18215).to(pipe.dtype)

    side = rgb.shape[-1]
    latent = encode(rgb)
    noise = torch.randn(latent.shape, device=pipe.device, dtype=pipe.dtype).repeat(2, 1, 1, 1)
    tokens = [latent.repeat(2, 1, 1, 1)] + [
        encode(F.interpolate(rgb, size=side // f, mode="bilinear", align_corners=False)).repeat(2, 1, 1, 1)
        for f in (2, 4, 8)]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(1, device=pipe.device)
    t = scheduler.timesteps[0]
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=pipe.device, dtype=pipe.dtype)
    bde = torch.cat([labels.sin(), labels.cos()], dim=-1)
    eps = pipe.unet(torch.cat([tokens[0], noise], 1), t.repeat(2), encoder_hidden_states=pipe.empty_text_embed.to(
        pipe.device, pipe.dtype).repeat(2, 1, 1), class_labels=bde, rgb_token=tokens).sample
    x0 = scheduler.step(eps, t, noise).prev_sample
    stacked = pipe.vae.decoder(pipe.vae.post_quant_conv((x0 / 0.18215).to(pipe.vae_dtype)))
    mask, edge = stacked.chunk(2, dim=0)
    mask, edge = mask.mean(1, keepdim=True), edge.mean(1, keepdim=True)
    return [(m.clamp(-1, 1) + 1) / 2 for m in (mask, edge)]


def reset_peak(device) -> None:
    """Forget the peak memory so far, so that building the model (float32, then cast) does not count."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM
    except OSError:
        pass


def peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # lifetime peak (no reset possible)


def worker(config: dict) -> None:
    """Build one configuration, then answer 'run' (one timed inference) until 'quit'."""
    import torch

    from diffdis_core.devices import pick_device, pick_dtype

    device = pick_device(config["device"])
    dtype = pick_dtype(config["dtype"], device)
    started = time.perf_counter()
    pipe = build_pipeline(device, dtype)
    authors = config["who"] == "authors"
    text_encoder = None
    if authors:
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**SD_TEXT_ENCODER_CONFIG)).to(device, dtype)  # resident
        pipe.set_channels_last(False)  # their code keeps PyTorch's default layout
    elif config.get("compile"):
        pipe.compile()
    resolution = config["resolution"]
    generator = torch.Generator(device).manual_seed(0)
    rgb = torch.rand(1, 3, resolution, resolution, generator=generator, device=device)

    def once():
        with torch.inference_mode():
            if authors:
                maps = authors_inference(pipe, rgb * 2 - 1)
            else:
                out = pipe(rgb, processing_res=resolution, decode_edge=config["edge"], output_size=False,
                           generator=torch.Generator(device).manual_seed(0))
                maps = [out.mask]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return maps

    reset_peak(device)
    if config.get("warm", True):
        start = time.perf_counter()
        once()  # kernel selection, allocator (and compilation with --compile)
        first = time.perf_counter() - start
    else:
        first = None
    print(json.dumps({"ready": True, "build_s": time.perf_counter() - started, "first_s": first,
                      "dtype": str(dtype).removeprefix("torch."), "device": str(device)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "mask":  # the mask, for accuracy comparisons
            mask = once()[0].float().cpu()
            path = config["mask_path"]
            torch.save(mask, path)
            print(json.dumps({"saved": path}), flush=True)
            continue
        start = time.perf_counter()
        once()
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": peak_gib(device)}), flush=True)
    del text_encoder


def conv_limit_gflops(dtype, side: int = 512, channels: int = 128, repeats: int = 5) -> float:
    """This machine's throughput on the pipeline's dominant operation: a 3x3 convolution, channels-last."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * channels * channels * 9 * side * side
    with torch.inference_mode():
        F.conv2d(x, weight, padding=1)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(x, weight, padding=1)
            times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_flops() -> dict:
    """torch's FLOP counter knows the CUDA attention kernels, not the CPU one (the UNet's attention at 1024²
    would count as zero FLOPs)."""
    import torch

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_flash_attention_flops} if op is not None else {}


def stage_worker(config: dict) -> None:
    """Load the released-layout folder as a user does, then one image stage by stage; print a JSON line
    per stage: seconds, peak GiB, GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffdis_core import DiffDISPipeline
    from diffdis_core.devices import pick_device, pick_dtype, reuse_freed_memory

    attention_flops = _cpu_attention_flops()
    device = pick_device(config["device"])
    dtype = pick_dtype(config["dtype"], device)
    resolution = config["resolution"]

    def report(stage, seconds, flops=None):
        print(json.dumps({"stage": stage, "seconds": seconds, "peak_gib": peak_gib(device),
                          "gflop": flops / 1e9 if flops else None}), flush=True)

    report("python, torch and diffusers imported", 0.0)
    reset_peak(device)
    start = time.perf_counter()
    pipe = DiffDISPipeline.from_pretrained(config["folder"], base=None, torch_dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    report("from_pretrained (released fp32 layout)", time.perf_counter() - start)
    rgb = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    stages = [("encode at 4 scales", lambda _: pipe.encode_condition(rgb, resolution, keep_image=False)),
              ("UNet (mask and edge streams)", lambda c: pipe.segment(c, generator=torch.Generator().manual_seed(0))),
              ("decode (mask only)", lambda latents: pipe.decode(latents, decode_edge=False, output_size=False))]
    flops = []
    if config.get("count_flops", True):
        value = None
        for _, stage in stages:  # counted in a pass of their own: counting slows the operations down
            with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=attention_flops) as counter:
                value = stage(value)
            flops.append(counter.get_total_flops())
        del value
    # As __call__: each stage reuses its freed memory and returns it when it ends.
    with torch.inference_mode(), reuse_freed_memory(device):
        value = None
        for index, (name, stage) in enumerate(stages):
            reset_peak(device)
            start = time.perf_counter()
            value = stage(value)
            report(name, time.perf_counter() - start, flops[index] if flops else None)
    print(json.dumps({"limit": {str(d).removeprefix("torch."): conv_limit_gflops(d) for d in {dtype, torch.float32}},
                      "dtype": str(dtype).removeprefix("torch.")}), flush=True)


def make_released_folder(folder: str) -> None:
    """The full-size architecture's random weights saved as the released model is laid out (float32)."""
    import torch

    if os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")):
        return
    print(f"writing the random full-size model in the released float32 layout to {folder} (once)", flush=True)
    build_pipeline(torch.device("cpu"), torch.float32).save_pretrained(folder)


# ------------------------------------------------------------------------------------------ the driver
class Worker:
    def __init__(self, config: dict):
        self.config = config
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.config} failed (see its error above)")
        return json.loads(line)

    def ask(self, command: str = "run") -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait()


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} threads, CPU"


def label(config: dict) -> str:
    if config["who"] == "authors":
        return "authors' sequence (mask + edge)"
    work = "mask + edge" if config["edge"] else "mask only"
    precision = "auto" if config["dtype"] == "auto" else "fixed"
    return f"ours, {precision}{', compiled' if config.get('compile') else ''} ({work})"


def speed_table(args, device_name: str) -> None:
    print(f"\nSpeed: one image, {args.repeats} timed pairs per row (authors, ours, alternately), medians\n")
    print("| size | run | precision | s/image | vs authors | peak GiB |")
    print("|---:|---|---|---:|---:|---:|")
    for resolution in args.resolutions:
        base = {"resolution": resolution, "device": device_name}
        authors = Worker({**base, "who": "authors", "dtype": "fp32", "edge": True})
        authors_times, peaks = [], []
        rows = []
        for dtype in args.dtypes:
            for edge in (False, True):
                config = {**base, "who": "ours", "dtype": dtype, "edge": edge, "compile": args.compile}
                ours = Worker(config)
                times = []
                for _ in range(args.repeats):
                    result = authors.ask()
                    authors_times.append(result["seconds"])
                    peaks.append(result["peak_gib"])
                    result = ours.ask()
                    times.append(result["seconds"])
                ours.close()
                rows.append((config, ours.info, statistics.median(times), result["peak_gib"]))
        authors.close()
        reference = statistics.median(authors_times)
        print(f"| {resolution}² | {label(authors.config)} | float32 | {reference:.2f} | 1.00× | {max(peaks):.2f} |")
        for config, info, seconds, peak in rows:
            compiled = f" (first call {info['first_s']:.0f} s)" if config.get("compile") else ""
            print(f"| {resolution}² | {label(config)}{compiled} | {info['dtype']} | {seconds:.2f} | "
                  f"{reference / seconds:.2f}× | {peak:.2f} |", flush=True)


def memory_table(args, device_name: str) -> None:
    print("\nPeak memory: one image, one run after building (includes the first call)\n")
    print("| size | run | precision | peak GiB | s (first call) |")
    print("|---:|---|---|---:|---:|")
    for resolution in args.memory_resolutions:
        configs = [{"who": "ours", "dtype": "auto", "edge": edge} for edge in (False, True)]
        if resolution <= args.authors_max_memory_res:
            configs.insert(0, {"who": "authors", "dtype": "fp32", "edge": True})
        for config in configs:
            config = {**config, "resolution": resolution, "device": device_name, "warm": False}
            try:
                worker_ = Worker(config)
                result = worker_.ask()
                worker_.close()
            except RuntimeError as failure:
                print(f"| {resolution}² | {label(config)} | {config['dtype']} | failed ({failure}) | |")
                continue
            print(f"| {resolution}² | {label(config)} | {worker_.info['dtype']} | {result['peak_gib']:.2f} | "
                  f"{result['seconds']:.1f} |", flush=True)
        if resolution > args.authors_max_memory_res:
            print(f"| {resolution}² | authors' sequence | float32 | not run (untiled {resolution}² decode of "
                  "2 maps: beyond this machine) | |")


def accuracy(args, device_name: str) -> None:
    import torch

    resolution = args.resolutions[0]
    masks = {}
    for dtype in ("fp32", "auto"):
        path = f"/tmp/diffdis-bench-mask-{dtype}-{os.getpid()}.pt"
        worker_ = Worker({"who": "ours", "dtype": dtype, "edge": False, "resolution": resolution,
                          "device": device_name, "warm": False, "mask_path": path})
        worker_.ask("mask")
        worker_.close()
        masks[worker_.info["dtype"]] = torch.load(path)
        os.remove(path)
    (auto_name, auto_mask), (_, full) = list(masks.items())[-1], list(masks.items())[0]
    difference = (auto_mask - full).abs()
    print(f"\nauto = {auto_name} here; its mask vs float32's at {resolution}² (random weights): "
          f"max abs {difference.max():.4f}, mean abs {difference.mean():.5f}")


def stages_table(args, device_name: str) -> None:
    subprocess.run([sys.executable, __file__, "--make-folder", args.released_folder], check=True)
    print("\nWhat a user pays: a fresh process loads the released float32 layout, then one image (mask only), "
          "stage by stage; peak = resident memory (VmHWM) reset before each stage\n")
    for resolution in args.stage_resolutions:
        config = {"device": device_name, "dtype": "auto", "resolution": resolution, "folder": args.released_folder,
                  "count_flops": not args.no_flops}
        process = subprocess.run([sys.executable, __file__, "--stage-worker", json.dumps(config)],
                                 stdout=subprocess.PIPE, text=True)
        lines = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
        limits = next((line for line in lines if "limit" in line), None)
        if process.returncode or limits is None:
            print(f"| {resolution}² | failed (exit {process.returncode}) |")
            continue
        dtype, limit = limits["dtype"], limits["limit"]
        print(f"{resolution}², {dtype}: this machine's 3x3 convolution (128 ch, 512², channels-last) reaches "
              + ", ".join(f"{v:.0f} GFLOP/s in {k}" for k, v in limit.items()) + "\n")
        print("| size | stage | peak GiB | s | GFLOP | GFLOP/s | % of the conv limit |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        total_flop = total_s = 0.0
        for line in lines:
            if "stage" not in line:
                continue
            rate = share = ""
            if line["gflop"]:
                total_flop += line["gflop"]
                total_s += line["seconds"]
                rate = f"{line['gflop'] / line['seconds']:.0f}"
                share = f"{100 * line['gflop'] / line['seconds'] / limit[dtype]:.0f} %"
            gflop = f"{line['gflop']:.3g}" if line["gflop"] else ""
            print(f"| {resolution}² | {line['stage']} | {line['peak_gib']:.2f} | {line['seconds']:.1f} | {gflop} | "
                  f"{rate} | {share} |")
        if total_s:
            print(f"| {resolution}² | one image (the three stages) | | {total_s:.1f} | {total_flop:.0f} | "
                  f"{total_flop / total_s:.0f} | {100 * total_flop / total_s / limit[dtype]:.0f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="our precisions (default: auto fp32 bf16, plus fp16 on a GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per row")
    parser.add_argument("--memory-resolutions", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--authors-max-memory-res", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet and VAE")
    parser.add_argument("--tables", nargs="+", default=["speed", "memory", "stages", "accuracy"],
                        choices=["speed", "memory", "stages", "accuracy"], help="which parts to run")
    parser.add_argument("--stage-resolutions", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--released-folder", default="/tmp/diffdis-released-fp32-random",
                        help="where the stages table keeps the random full-size model in the released layout")
    parser.add_argument("--no-flops", action="store_true", help="stages table without the FLOP-counting pass")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--stage-worker", help=argparse.SUPPRESS)
    parser.add_argument("--make-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.stage_worker:
        stage_worker(json.loads(args.stage_worker))
        return
    if args.make_folder:
        make_released_folder(args.make_folder)
        return

    import torch

    from diffdis_core.devices import pick_device, pick_dtype

    device = pick_device(args.device)
    if args.dtypes is None:
        args.dtypes = ["auto", "fp32", "bf16"] + (["fp16"] if device.type != "cpu" else [])
    # auto is one of the others: time it once, under its name ("auto" first, so it is labelled so).
    chosen = {}
    for name in args.dtypes:
        chosen.setdefault(pick_dtype(name, device), name)
    args.dtypes = list(chosen.values())
    print(f"DiffDIS inference benchmark on {machine_name()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if device.type == "cpu":
        print("No GPU here. On one, run: python benchmarks/inference.py --device cuda --resolutions 1024 "
              "--dtypes auto bf16 fp16 --compile   (and without --compile)")
    if "speed" in args.tables:
        speed_table(args, str(device))
    if "memory" in args.tables and args.memory_resolutions:
        memory_table(args, str(device))
    if "stages" in args.tables and args.stage_resolutions:
        stages_table(args, str(device))
    if "accuracy" in args.tables:
        accuracy(args, str(device))


if __name__ == "__main__":
    main()
