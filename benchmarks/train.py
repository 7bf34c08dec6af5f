"""Training throughput and peak memory of the full-size DiffDIS (SD-2.1-size UNet, random weights).

Times the training step of training/train.py (frozen-VAE encoding of image, mask and edge at 4 scales,
pyramid noise, one UNet pass over the [mask; edge] batch, backward, Adam) on synthetic tensors, so data
loading (done by DataLoader workers in parallel) is not included. Each configuration runs in a fresh
process so its peak memory is its own: CUDA's max allocated memory on a GPU, the process's peak RSS on CPU.

    python benchmarks/train.py                        # 1024² batch 4 (the paper) on the GPU, plus a small CPU run
    python benchmarks/train.py --device cpu --resolutions 128 --batch-sizes 2 --precisions no
    python benchmarks/train.py --resolutions 1024 --batch-sizes 4 2 --precisions no bf16 --checkpointing off on
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def measure(resolution: int, batch: int, precision: str, checkpointing: bool, device_name: str, steps: int) -> dict:
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler

    from diffdis_core import DiffDISPipeline, DiffDISUNet
    from diffdis_core.configs import SD_TURBO_SCHEDULER_CONFIG, SD_TURBO_UNET_CONFIG
    from diffdis_core.devices import vae_under_autocast
    from training.recipe import encode_batch, one_step_losses, optimizer_param_groups, pyramid_noise_like

    accelerator = Accelerator(mixed_precision=precision, cpu=device_name == "cpu")
    device = accelerator.device
    torch.manual_seed(0)
    unet = DiffDISUNet.from_config(SD_TURBO_UNET_CONFIG)
    with torch.no_grad():  # trained-like (non-zero) SWCI outputs; speed does not depend on the values
        for conv in [*unet.rgb_proj, *unet.rgb_proj1]:
            conv.weight.normal_(0, 1e-3)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG).requires_grad_(False)
    torch.nn.Module.to(vae, device)
    scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER_CONFIG)
    embed = torch.randn(1, 2, 1024, device=device)
    pipe = DiffDISPipeline(unet, vae, scheduler, embed)
    unet.train()
    optimizer = torch.optim.Adam(optimizer_param_groups(unet, 3e-5))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae_autocast = vae_under_autocast(precision, vae.config)  # as train.py (the SD VAE stays fp32 under fp16)

    image = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    mask = (torch.rand(batch, 1, resolution, resolution, device=device) > 0.5).float() * 2 - 1
    edge = (torch.rand(batch, 1, resolution, resolution, device=device) > 0.9).float() * 2 - 1
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        with torch.no_grad(), (accelerator.autocast() if vae_autocast else torch.autocast(device.type, enabled=False)):
            rgb_latents, target = encode_batch(pipe, image, mask, edge)
        noise = pyramid_noise_like(target, 0.8, generator)
        losses = one_step_losses(unet, scheduler, embed, rgb_latents, target, noise)
        accelerator.backward(losses.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(losses.total)

    step()  # warm-up: kernel selection, allocator, Adam state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        name = f"cpu ({torch.get_num_threads()} threads)"
    seconds = sorted(times)[len(times) // 2]  # median step
    return {"resolution": resolution, "batch": batch, "precision": precision, "checkpointing": checkpointing,
            "device": name, "seconds_per_step": seconds, "images_per_s": batch / seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: the GPU configurations when CUDA is present, plus the small CPU one")
    parser.add_argument("--resolutions", type=int, nargs="+", help="default: 1024 on GPU, 128 on CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 4 on GPU (the paper), 2 on CPU")
    parser.add_argument("--precisions", nargs="+", choices=["no", "bf16", "fp16"], help="default: no bf16 on GPU")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], help="default: off on on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (GPU 5, CPU 2)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, prints JSON
    args = parser.parse_args()

    if args.one:
        resolution, batch, precision, checkpointing, device = args.one.split(",")
        print(json.dumps(measure(int(resolution), int(batch), precision, checkpointing == "on", device,
                                 args.steps or 2)))
        return

    import torch

    plans = []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        plans.append(("cuda", args.resolutions or [1024], args.batch_sizes or [4], args.precisions or ["no", "bf16"],
                      args.checkpointing or ["off", "on"], args.steps or 5))
    elif args.device == "cuda":
        parser.error("no CUDA device here")
    if args.device in ("auto", "cpu"):
        plans.append(("cpu", args.resolutions or [128], args.batch_sizes or [2], args.precisions or ["no"],
                      args.checkpointing or ["off"], args.steps or 2))

    print("| device | resolution | batch | precision | grad. checkpointing | s/step | images/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for device, resolutions, batches, precisions, checkpointings, steps in plans:
        for resolution in resolutions:
            for batch in batches:
                for precision in precisions:
                    for checkpointing in checkpointings:
                        config = f"{resolution},{batch},{precision},{checkpointing},{device}"
                        run = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(steps)],
                                             capture_output=True, text=True)
                        if run.returncode != 0:
                            last = (run.stderr.strip().splitlines() or ["failed"])[-1]
                            print(f"| {device} | {resolution}² | {batch} | {precision} | {checkpointing} | "
                                  f"failed: {last} | | |", flush=True)
                            continue
                        r = json.loads(run.stdout.strip().splitlines()[-1])
                        print(f"| {r['device']} | {resolution}² | {batch} | {precision} | {checkpointing} | "
                              f"{r['seconds_per_step']:.2f} | {r['images_per_s']:.2f} | {r['peak_gib']:.1f} |",
                              flush=True)


if __name__ == "__main__":
    main()
