"""Memory: loading into a lower precision without a float32 copy of the weights."""

import weakref

import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffdis_core import DiffDISPipeline, DiffDISUNet


class LiveFloat32Bytes(TorchDispatchMode):
    """The most float32 tensor bytes alive at once (storages counted once), over every operation."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, tuple[weakref.ref, int]] = {}  # storage address -> (a tensor on it, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, out)):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                self.alive[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
        self.alive = {k: v for k, v in self.alive.items() if v[0]() is not None}
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


def test_loading_into_bfloat16_holds_one_float32_tensor_at_a_time(official_tiny):
    weights = official_tiny / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
    largest = max(4 * torch.Size(s).numel() for s in sizes)
    total = sum(4 * torch.Size(s).numel() for s in sizes)
    assert total > 20 * largest  # the bound below is far from the whole file
    with LiveFloat32Bytes() as tracked:
        unet = DiffDISUNet.from_pretrained(official_tiny, subfolder="unet", torch_dtype=torch.bfloat16)
    assert unet.dtype == torch.bfloat16
    assert tracked.peak >= largest  # the reads were seen
    assert tracked.peak <= 2 * largest, (tracked.peak, largest, total)


def test_pipeline_reads_the_unet_in_its_dtype(official_tiny, monkeypatch):
    from diffdis_core import pipeline

    asked = []
    read = pipeline.read_unet_state_dict
    monkeypatch.setattr(pipeline, "read_unet_state_dict", lambda path, dtype=None: asked.append(dtype) or read(path, dtype))
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None, torch_dtype=torch.bfloat16)
    assert asked == [torch.bfloat16] and pipe.unet.dtype == torch.bfloat16


def test_gpu_check_dry_run_on_the_cpu(capsys):
    """benchmarks/gpu_check.py's every row, on the CPU at a tiny size: parity, speed rows, the nodes' call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_check

    rows = gpu_check.main(["--device", "cpu", "--tiny", "--size", "64", "--repeats", "1", "--dtypes", "fp32",
                           "--compile", "off"])
    printed = capsys.readouterr().out
    checks = [row["check"] for row in rows]
    assert len(rows) == 5 and all(row["check"] in printed for row in rows)
    assert [row.get("ok") for row in rows if row["check"].startswith(("parity", "Remove"))] == [True] * 3, rows
    assert sum(row["check"].startswith("fp32") for row in rows) == 2 and "mask + edge" in checks[3]
    assert all(row["seconds"] > 0 for row in rows[2:])
