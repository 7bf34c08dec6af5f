"""Inference speed and peak memory of the full-size DiffDIS architecture (random weights).

Times one image end to end (encode at 4 scales, one UNet step of batch 2, decode) at each resolution
and precision, mask only and mask + edge, and the authors' pipeline for comparison: their sequence of
operations (always decoding mask and edge in one batch of 2, `DDPMScheduler.step`) with their text
encoder kept in memory. Each configuration runs in a fresh process so peak memory is its own.
On CPU our runs use the command line's allocator setting (`keep_freed_memory`); `--default-allocator`
measures them as a Python program or ComfyUI runs them.

    python benchmarks/inference.py                      # 512/768/1024 x fp32/bf16/fp16 on the best device
    python benchmarks/inference.py --resolutions 512 --dtypes fp32 --device cpu
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

MODES = ("mask", "mask+edge", "authors")

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
    embed = torch.randn(1, 2, 1024)
    return DiffDISPipeline(unet, vae, scheduler, embed).to(device, dtype)


def authors_inference(pipe, rgb, text_encoder):
    """The authors' single_infer + decode, expressed with the same modules (text encoder resident)."""
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
    eps = pipe.unet(torch.cat([tokens[0], noise], 1), t.repeat(2), encoder_hidden_states=pipe.empty_text_embed.repeat(
        2, 1, 1), class_labels=bde, rgb_token=tokens).sample
    x0 = scheduler.step(eps, t, noise).prev_sample
    stacked = pipe.vae.decoder(pipe.vae.post_quant_conv((x0 / 0.18215).to(pipe.vae_dtype)))
    mask, edge = stacked.chunk(2, dim=0)
    return mask.mean(1, keepdim=True), edge.mean(1, keepdim=True), text_encoder


def reset_peak_rss() -> None:
    """Forget the process's peak resident memory so far (Linux), so that building the model (in
    float32, then cast) does not count: the peak is then weights + inference."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # lifetime peak (no reset possible)


def measure(resolution: int, dtype_name: str, mode: str, device_name: str, repeats: int,
            default_allocator: bool) -> dict:
    import torch

    from diffdis_core.devices import keep_freed_memory, pick_device, pick_dtype

    device = pick_device(device_name)
    if mode != "authors" and device.type == "cpu" and not default_allocator:
        keep_freed_memory()  # as `python -m diffdis_core` does on CPU
    dtype = pick_dtype(dtype_name, device)
    pipe = build_pipeline(device, dtype)
    text_encoder = None
    if mode == "authors":
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**SD_TEXT_ENCODER_CONFIG)).to(device, dtype)
        for module in (pipe.unet, pipe.vae):  # their code keeps PyTorch's default layout
            torch.nn.Module.to(module, memory_format=torch.contiguous_format)
    rgb = torch.rand(1, 3, resolution, resolution, device=device)

    def once():
        with torch.inference_mode():
            if mode == "authors":
                authors_inference(pipe, rgb * 2 - 1, text_encoder)
            else:
                pipe(rgb, processing_res=resolution, decode_edge=mode == "mask+edge",
                     generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up (kernel selection, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = peak_rss_gib()
    return {"resolution": resolution, "dtype": dtype_name, "mode": mode, "device": str(device),
            "seconds": min(times), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is for our runs too (as inside ComfyUI or a Python "
                             "program), instead of the command line's keep_freed_memory() on CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()

    if args.one:
        resolution, dtype_name, mode = args.one.split(",")
        print(json.dumps(measure(int(resolution), dtype_name, mode, args.device, args.repeats,
                                 args.default_allocator)))
        return

    print(f"{'res':>5} {'dtype':>5} {'mode':>10} {'device':>7} {'s/image':>8} {'peak GiB':>9} {'vs authors':>10}")
    for resolution in args.resolutions:
        for dtype_name in args.dtypes:
            baseline = None
            for mode in sorted(args.modes, key=lambda m: m != "authors"):
                command = [sys.executable, __file__, "--one", f"{resolution},{dtype_name},{mode}",
                           "--device", args.device, "--repeats", str(args.repeats)]
                command += ["--default-allocator"] if args.default_allocator else []
                run = subprocess.run(command, capture_output=True, text=True)
                if run.returncode != 0:
                    last = (run.stderr.strip().splitlines() or ["failed"])[-1]
                    print(f"{resolution:>5} {dtype_name:>5} {mode:>10}  failed: {last}", flush=True)
                    continue
                row = json.loads(run.stdout.strip().splitlines()[-1])
                if mode == "authors":
                    baseline = row["seconds"]
                speedup = f"{baseline / row['seconds']:.2f}x" if baseline else "-"
                print(f"{resolution:>5} {dtype_name:>5} {mode:>10} {row['device']:>7} {row['seconds']:>8.2f} "
                      f"{row['peak_gib']:>9.2f} {speedup:>10}", flush=True)


if __name__ == "__main__":
    main()
