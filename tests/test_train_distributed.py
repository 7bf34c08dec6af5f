"""Training and evaluation under ``accelerate launch`` with two CPU processes (gloo), as CI can run them.

The processes are started by accelerate's own launcher, exactly as a user's multi-GPU command starts
them, on a machine without a GPU: they must form one run (ranks sharing the data and the gradients),
not two copies racing on the same files.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training import evaluate as evaluate_script
from training.synthetic import make_dataset, make_split, make_tiny_base

ROOT = Path(__file__).resolve().parent.parent

# Runs train() in each process and keeps that rank's trained parameters (outside the run folder).
TRAIN_DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from training import train

result = train.train(train.build_parser().parse_args(sys.argv[1:]))
weights = {{name: p.detach().contiguous() for name, p in result.unet.named_parameters()}}
save_file(weights, os.path.join({ranks!r}, "rank%s.safetensors" % os.environ["RANK"]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, *argv, processes=2):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), *map(str, argv)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the processes share the cores out
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_cpu_processes_train_one_model_and_resume_it(tmp_path):
    base, dataset = make_tiny_base(tmp_path / "base"), make_dataset(tmp_path / "DIS5K", train=8, val=1)
    driver = tmp_path / "driver.py"
    common = ["--pretrained", base, "--base", "none", "--dataset", dataset, "--resolution", 64, "--batch-size", 2,
              "--num-workers", 0, "--log-every", 1, "--checkpoint-every", 2, "--keep-checkpoints", 0,
              "--max-steps", 4, "--lr", "1e-3"]

    straight, ranks = tmp_path / "straight", tmp_path / "ranks"
    ranks.mkdir()
    driver.write_text(TRAIN_DRIVER.format(root=str(ROOT), ranks=str(ranks)))
    first = accelerate_launch(driver, "--output", straight, *common)
    # One run of 2 ranks: 2 steps per epoch of 8 images (2 per process × 2 processes), one log, one model.
    assert "2 steps per epoch" in first.stdout and "(2 × 2 process(es) × 1)" in first.stdout
    assert first.stdout.count("done: 4 steps") == 1
    log = read_log(straight / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[1]["epoch"] == 1.0
    assert sorted(p.name for p in straight.iterdir()) == ["checkpoint-2", "checkpoint-4", "edge_cache", "final",
                                                          "train_log.jsonl"]
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # the main process writes; each rank adds its RNG state
        assert sorted(p.name for p in (straight / checkpoint).iterdir()) == [
            "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "training_state.json",
            "unet"]
    rank0, rank1 = (load_file(ranks / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    final = load_file(straight / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], rank0[k]) for k in rank0)
    assert final["rgb_proj.0.weight"].abs().max() > 0  # trained (starts at zero)

    # Killed after checkpoint-2: the resumed 2-process run ends where the uninterrupted one did.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for folder in ("checkpoint-4", "final"):
        shutil.rmtree(resumed / folder)
    ranks.rename(tmp_path / "ranks_straight")
    ranks.mkdir()
    second = accelerate_launch(driver, "--output", resumed, "--resume", *common)
    assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in second.stdout
    again = read_log(resumed / "train_log.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(log, again, strict=True):
        assert a["images"] == b["images"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    rank0, rank1 = (load_file(ranks / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max((rank0[k] - final[k]).abs().max().item() for k in rank0) < 1e-5


def test_two_processes_evaluate_each_image_once_and_as_one_process_does(official_tiny, tmp_path, capsys):
    folder = tmp_path / "toy"
    names = make_split(folder, 5, seed=3)  # 5 images over 2 processes: shards of 3 and 2
    common = ["--model", official_tiny, "--base", "none", "--dataset", folder, "--resolution", 64, "--no-tta",
              "--seed", 5, "--no-hce", "--num-workers", 0]
    assert evaluate_script.main([str(a) for a in [*common, "--save-pred", tmp_path / "one", "--json",
                                                  tmp_path / "one.json"]]) == 0
    capsys.readouterr()
    accelerate_launch(ROOT / "training" / "evaluate.py", *common, "--save-pred", tmp_path / "two", "--json",
                      tmp_path / "two.json")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["toy"] for n in ("one", "two"))
    # Every image scored once (the processes' counts add up to 5) and written (so each by exactly one process).
    assert one["images"] == two["images"] == 5
    written = sorted(p.stem for p in (tmp_path / "two" / "toy" / "mask").iterdir())
    assert written == sorted(names)
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / run / "toy" / "mask" / f"{name}.png"), np.int16)
                for run in ("one", "two"))
        assert np.abs(a - b).max() <= 1
    for key in ("Fmax", "Fw", "Em", "Sm", "MAE"):
        assert two[key] == pytest.approx(one[key], abs=2e-3)
