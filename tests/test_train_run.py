"""End-to-end CPU training runs with a tiny SD-Turbo-like base and a toy DIS-style dataset."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdis_core import DiffDISPipeline, DiffDISUNet
from training import train as train_script
from training.synthetic import make_dataset, make_tiny_base

ROOT = Path(__file__).resolve().parent.parent
LOG_KEYS = {"step", "epoch", "loss", "mask_loss", "edge_loss", "lr", "images_per_s"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_training")
    return make_tiny_base(root / "sd_turbo_tiny"), make_dataset(root / "DIS5K", train=8, val=2)


def run(toy, output, *extra):
    base, dataset = toy
    return train_script.main(["--pretrained", str(base), "--base", "none", "--dataset", str(dataset),
                              "--output", str(output), "--resolution", "64", "--batch-size", "2",
                              "--num-workers", "0", "--log-every", "1", *map(str, extra)])


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def the_error(err):
    """The one error line of a run's stderr (which may also hold its progress bar), never a traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_smoke_run_learns_and_leaves_checkpoints_and_a_loadable_model(toy, tmp_path):
    _, dataset = toy
    before = listing(dataset)
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "30", "--lr", "1e-3", "--checkpoint-every", "10", "--keep-checkpoints", "2",
               "--validate-every", "15") == 0

    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(LOG_KEYS <= set(r) for r in log)
    assert log[3]["epoch"] == 1.0  # 8 images / batch 2 = 4 steps per epoch
    assert log[0]["lr"] == 1e-3 and log[0]["bde_lr"] == pytest.approx(1e-2)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first, f"loss did not fall: {first:.1f} -> {last:.1f}"
    assert all(abs(r["loss"] - r["mask_loss"] - r["edge_loss"]) < 1e-3 * r["loss"] for r in log)

    val = read_log(out / "val_log.jsonl")
    assert [r["step"] for r in val] == [15, 30] and all({"Fmax", "Fw", "Em", "Sm", "MAE"} <= set(r) for r in val)

    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]  # the last two kept
    last_ckpt = out / "checkpoint-30"
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "optimizer.bin", "scheduler.bin",
                 "random_states_0.pkl", "training_state.json"):
        assert (last_ckpt / name).is_file(), name
    assert json.loads((last_ckpt / "training_state.json").read_text())["step"] == 30
    assert not list(out.glob(".*partial"))

    final = out / "final"
    trained = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    checkpointed = load_file(last_ckpt / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == checkpointed.keys() and all(torch.equal(trained[k], checkpointed[k]) for k in trained)
    DiffDISUNet.from_pretrained(last_ckpt / "unet")  # strict load: the released layout
    pipe = DiffDISPipeline.from_pretrained(final, base=None)
    mask = pipe(torch.rand(1, 3, 50, 70), processing_res=64, generator=torch.Generator().manual_seed(0)).mask
    assert mask.shape == (1, 1, 50, 70) and 0 <= mask.min() and mask.max() <= 1
    # Trained weights differ from the start, including the zero-initialised SWCI outputs.
    assert trained["rgb_proj.0.weight"].abs().max() > 0

    assert listing(dataset) == before  # edge maps are cached in the run folder, not the dataset
    assert (out / "edge_cache").is_dir()


def test_resume_continues_the_same_run(toy, tmp_path):
    # lr halves every epoch (4 steps) here, so the schedule is checked across the resume too.
    common = ["--lr", "1e-3", "--lr-decay", "0.5", "--lr-decay-epochs", "1", "--checkpoint-every", "2",
              "--keep-checkpoints", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(toy, straight, "--max-steps", "6", *common) == 0
    assert run(toy, resumed, "--max-steps", "2", *common) == 0
    # A run killed during step 3 and while writing checkpoint 4: a logged step after the checkpoint and a
    # half-written checkpoint folder, both to be discarded.
    with open(resumed / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    (resumed / ".checkpoint-4.partial" / "unet").mkdir(parents=True)
    assert run(toy, resumed, "--max-steps", "6", "--resume", *common) == 0

    a, b = read_log(straight / "train_log.jsonl"), read_log(resumed / "train_log.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["lr"] for r in b] == pytest.approx([1e-3] * 4 + [5e-4] * 2)
    for x, y in zip(a, b, strict=True):
        assert x["images"] == y["images"]  # same data order, through an epoch boundary (4 steps per epoch)
        assert x["lr"] == y["lr"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa = load_file(straight / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5
    assert not (resumed / ".checkpoint-4.partial").exists()


def test_run_folder_is_never_overwritten_unasked(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "1", "--no-cutmix") == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert run(toy, out, "--max-steps", "2", "--resume", "--batch-size", "4") == 2
    assert "batch_size 2 -> 4" in capsys.readouterr().err
    assert run(toy, out, "--max-steps", "2", "--overwrite", "--checkpoint-every", "2") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "3"], "--batch-size must be even"),
    (["--resolution", "96"], "--resolution must be a multiple of 64 from 64 to 4096, got 96: use 64 or 128"),
    (["--validate-every", "2", "--val-tta"], "--resolution (the validation size) must be a multiple of 256"),
    (["--resume", "--overwrite"], "pass only one"),
])
def test_bad_options_fail_in_one_line(toy, tmp_path, capsys, extra, message):
    assert run(toy, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_script_reports_a_missing_dataset_in_one_line(tmp_path):
    # Run as a file from another folder, as `python path/to/training/train.py` is.
    result = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--dataset", str(tmp_path / "nope"),
                             "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: dataset folder {tmp_path / 'nope'} does not exist; "
                                                  "expected DIS5K layout (<dataset>/<split>/im/*.jpg + gt/*.png) "
                                                  "or a folder with im/ and gt/"]
    assert not (tmp_path / "run").exists()


def test_the_seed_fixes_the_run_whatever_is_cached(toy, tmp_path, capsys):
    # The first run writes the edge maps, the second finds them cached: the same seed, the same step.
    cache = tmp_path / "edges"
    assert run(toy, tmp_path / "fresh", "--max-steps", "1", "--edge-cache", cache) == 0
    assert "wrote 8 edge map(s)" in capsys.readouterr().out
    assert run(toy, tmp_path / "cached", "--max-steps", "1", "--edge-cache", cache) == 0
    assert "edge map(s)" not in capsys.readouterr().out
    fresh, cached = (read_log(tmp_path / name / "train_log.jsonl")[0] for name in ("fresh", "cached"))
    assert fresh["loss"] == cached["loss"]


@pytest.fixture(scope="module")
def two_checkpoints(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    assert run(toy, out, "--max-steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "0") == 0
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged, damage, problem", [
    ("optimizer.bin", truncate, "is truncated or damaged"),
    ("training_state.json", lambda path: path.write_text('{"step": 2, "identi'), "is not valid JSON"),
])
def test_resume_falls_back_from_a_damaged_checkpoint_and_says_so(toy, two_checkpoints, tmp_path, capsys,
                                                                 damaged, damage, problem):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    damage(out / "checkpoint-2" / damaged)
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "3", "--resume", "--checkpoint-every", "1", "--keep-checkpoints", "0") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if problem in line]
    assert len(said) == 1 and said[0].startswith(f"{out / 'checkpoint-2' / damaged} {problem}")
    assert said[0].endswith("resuming from checkpoint-1 instead (the damaged one is now checkpoint-2.damaged)")
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3]  # step 2 done again
    assert (out / "checkpoint-2.damaged" / damaged).is_file()  # kept for inspection, never resumed from
    assert train_script.check_checkpoint(out / "checkpoint-2")["step"] == 2
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["step"] == 3


@pytest.mark.parametrize("damaged, damage, problem", [
    ("unet/diffusion_pytorch_model.safetensors", truncate, "is truncated: "),
    ("training_state.json", lambda path: path.write_text('{"step": "two"}'), "does not hold a training state"),
    ("scheduler.bin", lambda path: torch.save({"no": "scheduler"}, path), "could not load"),
])
def test_a_damaged_checkpoint_with_none_before_it_is_named_in_one_line(toy, two_checkpoints, tmp_path, capsys,
                                                                       damaged, damage, problem):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    shutil.rmtree(out / "checkpoint-1")
    damage(out / "checkpoint-2" / damaged)
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "3", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and problem in err and "--overwrite" in err
    assert str(out / "checkpoint-2") in err
    assert (out / "checkpoint-2").is_dir() and [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2]


def test_model_errors_name_this_scripts_options(toy, tmp_path, capsys):
    _, dataset = toy
    assert train_script.main(["--pretrained", str(tmp_path / "no_such_model"), "--base", "none", "--dataset",
                              str(dataset), "--output", str(tmp_path / "run"), "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "--model" not in err and "does not exist" in err


def test_overwrite_keeps_the_starting_model_inside_the_output_and_trains_from_it(toy, tmp_path, capsys):
    base, _ = toy
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "2", "--lr", "1e-3") == 0
    start = tmp_path / "start"
    shutil.copytree(out / "final", start)
    # Fine-tune the run's own final/ again, in the same folder: it is read before anything is removed.
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "1", "--pretrained", out / "final", "--overwrite") == 0
    assert f"fine-tuning the DiffDIS UNet {out / 'final'}" in capsys.readouterr().out
    # The same fine-tune from a copy elsewhere gives the same step and the same model.
    assert run(toy, tmp_path / "elsewhere", "--max-steps", "1", "--pretrained", start) == 0
    again, elsewhere = (read_log(folder / "train_log.jsonl") for folder in (out, tmp_path / "elsewhere"))
    assert [r["step"] for r in again] == [1] and again[0]["loss"] == elsewhere[0]["loss"]
    a, b = (load_file(folder / "final" / "unet" / "diffusion_pytorch_model.safetensors")
            for folder in (out, tmp_path / "elsewhere"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_sets_a_starting_checkpoint_aside(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoint-2/unet", "checkpoint-4/unet", "final/unet", ".checkpoint-6.abc123.tmp"):
        (out / name).mkdir(parents=True)
    (out / "train_log.jsonl").write_text("{}\n")
    said = []
    train_script.remove_previous_run(out, [out / "checkpoint-2" / "unet"], said.append)
    # Renamed out of the names resume and rotation use; the rest of the old run is gone.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2.start"]
    assert said == [f"kept the starting model {out / 'checkpoint-2'} as checkpoint-2.start"]


@pytest.mark.parametrize("mistake", ["typo in --pretrained", "truncated training image"])
def test_overwrite_deletes_nothing_when_the_run_cannot_start(toy, tmp_path, capsys, mistake):
    base, dataset = toy
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "1", "--no-cutmix") == 0
    before = listing(out)
    if mistake == "typo in --pretrained":
        extra, expected = ["--pretrained", tmp_path / "no_such_model"], "--pretrained"
    else:
        copy = tmp_path / "DIS5K"
        shutil.copytree(dataset, copy)
        damaged = sorted((copy / "DIS-TR" / "im").iterdir())[5]
        truncate(damaged)
        extra, expected = ["--dataset", copy], f"{damaged}: unreadable image"
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "1", "--overwrite", *extra) == 2
    assert expected in the_error(capsys.readouterr().err)
    assert listing(out) == before


def test_a_damaged_training_image_stops_the_run_before_step_1(toy, tmp_path, capsys):
    _, dataset = toy
    copy = tmp_path / "DIS5K"
    shutil.copytree(dataset, copy)
    damaged = sorted((copy / "DIS-TR" / "gt").iterdir())[6]  # a mask, sampled late (if at all) in step order
    truncate(damaged)
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "1", "--dataset", copy) == 2
    assert the_error(capsys.readouterr().err).startswith(f"error: {damaged}: unreadable mask")
    assert not (out / "train_log.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_a_diverging_run_stops_keeps_its_checkpoints_and_writes_no_final(toy, tmp_path, capsys, monkeypatch):
    from training import recipe

    real, calls = recipe.one_step_losses, []

    def nan_from_step_5(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        return losses if len(calls) < 5 else recipe.StepLosses(losses.total * torch.nan, losses.mask, losses.edge)

    monkeypatch.setattr(recipe, "one_step_losses", nan_from_step_5)
    out = tmp_path / "run"
    capsys.readouterr()
    assert run(toy, out, "--max-steps", "8", "--checkpoint-every", "2", "--keep-checkpoints", "1") == 2
    error = the_error(capsys.readouterr().err)
    assert error.startswith("error: the loss is not finite at step 5: training stopped")
    assert "every checkpoint kept (checkpoint-2, checkpoint-4)" in error
    # checkpoint-2 outlives --keep-checkpoints 1: checkpoint-4 never gave a finite step.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "final").exists()
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3, 4]


def test_a_learning_rate_that_diverges_stops_the_run(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(toy, out, "--max-steps", "6", "--lr", "1e30") == 2
    error = the_error(capsys.readouterr().err)
    assert "is not finite at step 2" in error and "lower --lr (now 1e+30)" in error
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.0001"), ("--bde-lr-scale", "nan"),
    ("--lr-decay", "0"), ("--max-grad-norm", "-1"), ("--edge-weight", "inf"), ("--cutmix-prob", "1.5"),
    ("--batch-size", "0"), ("--seed", "-1"),
])
def test_bad_numbers_are_refused_as_they_are_parsed(toy, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        run(toy, tmp_path / "run", option, value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {option}: ") and value in err[0]
    assert not (tmp_path / "run").exists()


def test_checkpoints_and_the_final_model_are_readable_as_the_umask_says(toy, tmp_path):
    mask = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert run(toy, out, "--max-steps", "1") == 0
    finally:
        os.umask(mask)
    written = [p for folder in ("checkpoint-1", "final") for p in (out / folder).rglob("*")]
    assert any(p.name == "diffusion_pytorch_model.safetensors" for p in written)  # safetensors makes these 0600
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in written}
    assert modes == {path: 0o750 if (out / path).is_dir() else 0o640 for path in modes}
    assert (out / "checkpoint-1").stat().st_mode & 0o777 == 0o750 and (out / "final").stat().st_mode & 0o777 == 0o750


def console_scripts():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("how", ["file", "module", *console_scripts()])
def test_the_commands_run_as_files_modules_and_console_scripts(tmp_path, how):
    # Installed, training/ is the package diffdis_training: a link of that name stands in for the install.
    installed = tmp_path / "site"
    installed.mkdir()
    (installed / "diffdis_training").symlink_to(ROOT / "training", target_is_directory=True)
    if how == "file":  # from another folder, as `python path/to/training/train.py`
        command = [sys.executable, str(ROOT / "training" / "train.py")]
    elif how == "module":
        command = [sys.executable, "-m", "diffdis_training.train"]
    else:  # what pip's console-script wrapper does
        module, function = console_scripts()[how].split(":")
        command = [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(ROOT)])}
    help_ = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert help_.returncode == 0 and help_.stdout.startswith("usage:"), help_.stderr
    if how in ("file", "module", "diffdis-train"):  # past the package's lazy (relative) imports to a one-line error
        result = subprocess.run([*command, "--dataset", "nope", "--output", "run", "--pretrained", "nope"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == ["error: dataset folder nope does not exist; expected DIS5K "
                                                      "layout (<dataset>/<split>/im/*.jpg + gt/*.png) or a folder "
                                                      "with im/ and gt/"]
