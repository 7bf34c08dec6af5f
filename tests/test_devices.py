"""Device and precision choice: `auto` is the fastest precision that is safe on the device."""

import pytest
import torch

from diffdis_core import DiffDISError, DiffDISPipeline
from diffdis_core import devices


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, torch.bfloat16),  # AMD Zen 4+, Intel Cooper Lake
    ({"avx512_bf16": False, "amx_bf16": True}, torch.bfloat16),  # Intel Sapphire Rapids+
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, torch.float32),  # emulated bf16 is slow
    ({}, torch.float32),  # e.g. an ARM CPU torch reports nothing for
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert devices.pick_dtype("auto", torch.device("cpu")) == expected
    assert devices.vae_dtype(expected) == expected  # no float32 VAE for bf16 or fp32


def test_auto_without_the_capability_query_is_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert devices.auto_dtype("cpu") == torch.float32


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((6, 1), torch.float16)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert devices.auto_dtype(torch.device("cuda")) == expected


def test_float16_keeps_the_vae_in_float32_when_it_asks():
    assert devices.vae_dtype(torch.float16, force_upcast=True) == torch.float32
    assert devices.vae_dtype(torch.float16, force_upcast=False) == torch.float16
    assert devices.vae_dtype(torch.bfloat16, force_upcast=True) == torch.bfloat16


def test_named_dtypes_and_a_clear_error():
    assert devices.pick_dtype("fp16", "cpu") == torch.float16
    assert devices.pick_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    with pytest.raises(DiffDISError, match="unknown dtype 'fp8'.*auto, fp32, fp16 or bf16"):
        devices.pick_dtype("fp8", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_from_pretrained_auto_uses_the_rule(official_tiny, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native})
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype="auto")
    assert pipe.dtype == pipe.vae_dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("mixed_precision, config, covered", [
    ("bf16", {}, True),
    ("fp16", {"force_upcast": True}, False),
    ("fp16", {}, False),  # the pipeline's default: a VAE config that does not say is upcast
    ("fp16", {"force_upcast": False}, True),
    ("no", {}, False),
])
def test_training_autocasts_the_vae_by_the_pipelines_upcast_rule(mixed_precision, config, covered):
    assert devices.vae_under_autocast(mixed_precision, config) is covered
    assert devices.vae_force_upcast(config) is config.get("force_upcast", True)


def test_the_command_lines_device_choice(monkeypatch):
    from diffdis_core.distributed import process_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_device("cpu") == (None, torch.device("cpu"))  # one process: no accelerate state
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DiffDISError, match="--device cuda:1: under accelerate launch each process takes its own"):
        process_device("cuda:1")
