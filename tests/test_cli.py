"""The command line: diffdis INPUT... --output DIR (also python -m diffdis_core)."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from diffdis_core import DiffDISError, DiffDISPipeline
from diffdis_core.cli import collect_inputs, main
from diffdis_core.image_io import is_whole_png, open_image, result_info

ROOT = Path(__file__).resolve().parent.parent
ROOT_ARGS = ["--base", "none", "--resolution", "64"]


def cli(official_tiny, *args):
    return main([*args, "--model", str(official_tiny), *ROOT_ARGS])


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def summary(err):
    lines = [line for line in err.splitlines() if " already done, " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(DiffDISPipeline, "from_pretrained", refuse)


def test_cutout_is_rgba_at_the_displayed_size(tmp_path, official_tiny, tiny_pipeline):
    image = noise_image(30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° for display
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert cli(official_tiny, str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "out"), "--seed", "3",
               "--dtype", "fp32", "--no-refine-foreground") == 0
    result = Image.open(tmp_path / "out" / "photo.png")
    assert result.mode == "RGBA" and result.size == (30, 50)  # width, height after rotation
    rgb = open_image(tmp_path / "photo.jpg").rgb()
    photo = ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg"))  # as the Python API gets it
    expected = tiny_pipeline(photo, processing_res=64, generator=torch.Generator().manual_seed(3),
                             decode_edge=False).mask[0, 0]
    alpha = np.asarray(result)[..., 3].astype(np.float32) / 255
    assert np.abs(alpha - expected.numpy()).max() <= 1 / 255 + 1e-6
    assert np.array_equal(np.asarray(result)[..., :3], rgb.permute(1, 2, 0).numpy())


def test_odd_but_valid_images_just_work(tmp_path, official_tiny):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("L", (20, 10), 128).save(src / "gray.png")
    Image.new("RGBA", (12, 14), (10, 200, 30, 0)).save(src / "alpha.png")
    Image.fromarray((np.arange(300).reshape(15, 20) * 200).astype(np.uint16)).save(src / "deep.png")
    Image.new("P", (9, 9)).save(src / "palette.gif")
    Image.new("CMYK", (16, 8), (0, 50, 100, 0)).save(src / "print.tiff")
    noise_image(21, 13).save(src / "web.webp")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(src / "dot.bmp")
    Image.new("1", (7, 5), 1).save(src / "bits.png")
    assert cli(official_tiny, str(src), "--output", str(tmp_path / "out"), "--save-mask", "--save-edge") == 0
    expected = {"gray": (20, 10), "alpha": (12, 14), "deep": (20, 15), "palette": (9, 9), "print": (16, 8),
                "web": (13, 21), "dot": (1, 1), "bits": (7, 5)}
    for stem, size in expected.items():
        assert Image.open(tmp_path / "out" / f"{stem}.png").size == size
        assert Image.open(tmp_path / "out" / f"{stem}_mask.png").mode == "L"
        assert Image.open(tmp_path / "out" / f"{stem}_edge.png").size == size


def test_sixteen_bit_input_keeps_its_range(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    assert torch.allclose(open_image(tmp_path / "white16.png").rgb(), torch.ones(3, 4, 4))


def test_rerun_resumes_and_adds_missing_extras(tmp_path, official_tiny, capsys, monkeypatch):
    for i in range(3):
        noise_image(16, 24, seed=i).save(tmp_path / f"{i}.jpg")
    out = tmp_path / "out"
    args = [str(tmp_path / "*.jpg"), "--output", str(out)]
    assert cli(official_tiny, *args) == 0
    assert summary(capsys.readouterr().err).startswith("3 written, 0 already done, 0 failed")
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    # A resumed batch whose work is all done: exit 0, says so, touches nothing, loads no model.
    with monkeypatch.context() as patch:
        patch.setattr(DiffDISPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
        assert cli(official_tiny, *args) == 0
        line = summary(capsys.readouterr().err)
        assert line.startswith("0 written, 3 already done, 0 failed") and "all inputs were already done" in line
        # --save-mask on finished cutouts: the mask is their alpha, no model run, the cutouts stay.
        assert cli(official_tiny, *args, "--save-mask") == 0
        assert summary(capsys.readouterr().err).startswith("3 written, 0 already done, 0 failed")
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(out / f"{i}_mask.png")),
                              np.asarray(Image.open(out / f"{i}.png"))[..., 3])
        assert (out / f"{i}.png").read_bytes() == first[f"{i}.png"]

    # --save-edge needs the model: only the edges are written.
    (out / "1_mask.png").unlink()
    assert cli(official_tiny, *args, "--save-mask", "--save-edge") == 0
    assert summary(capsys.readouterr().err).startswith("3 written, 0 already done, 0 failed")
    for i in range(3):
        assert Image.open(out / f"{i}_edge.png").mode == "L"
        assert (out / f"{i}.png").read_bytes() == first[f"{i}.png"]
    assert np.array_equal(np.asarray(Image.open(out / "1_mask.png")), np.asarray(Image.open(out / "1.png"))[..., 3])

    # Other settings: the results are not up to date, so they are redone, and the summary says why.
    assert cli(official_tiny, *args, "--seed", "5") == 0
    assert summary(capsys.readouterr().err).startswith("3 written (3 redone: 3 other settings), 0 already done")
    assert all(result_info(out / f"{i}.png")["settings"]["seed"] == 5 for i in range(3))


def test_a_file_diffdis_did_not_write_is_never_overwritten(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "a.jpg")
    noise_image(16, 16, seed=1).save(tmp_path / "b.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's own file")
    assert cli(official_tiny, str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--output", str(out)) == 1
    err = capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"the user's own file"
    assert "is not a DiffDIS cutout" in err and "--overwrite" in err
    assert summary(err).startswith("1 written, 0 already done, 1 failed")
    assert cli(official_tiny, str(tmp_path / "a.jpg"), "--output", str(out), "--overwrite") == 0
    assert Image.open(out / "a.png").mode == "RGBA"


def test_never_overwrites_an_input(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(tmp_path), "--overwrite") == 1
    assert (tmp_path / "a.png").read_bytes() == before
    assert "would overwrite an input" in capsys.readouterr().err


def test_same_name_twice_is_refused_for_the_second(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "x.png")
    noise_image(16, 16).save(tmp_path / "x.jpg")
    assert cli(official_tiny, str(tmp_path / "x.jpg"), str(tmp_path / "x.png"), "--output", str(tmp_path / "o")) == 1
    assert "result name is taken by" in capsys.readouterr().err


def test_broken_files_are_one_line_each_and_the_rest_still_run(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "cut.jpg").write_bytes(open(tmp_path / "good.png", "rb").read()[:40])
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    code = cli(official_tiny, str(tmp_path / "*.*"), str(tmp_path / "missing.png"), "--output", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    for name in ("broken.png", "cut.jpg", "dangling.jpg", "missing.png"):
        assert sum(name in line for line in err.splitlines()) == 1, name
    assert summary(err).startswith("1 written, 0 already done, 4 failed")
    assert (tmp_path / "out" / "good.png").is_file()


@pytest.mark.parametrize("failure, reason", [
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(details)"),
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    (DiffDISError("the model gave non-finite values (damaged weights?)"), "non-finite values"),
    (MemoryError(), "out of memory"),
])
def test_any_failure_inside_inference_stops_only_that_image(tmp_path, official_tiny, capsys, monkeypatch, failure,
                                                            reason):
    for i in range(3):
        noise_image(16, 16, seed=i).save(tmp_path / f"{i}.png")
    calls = []
    original = DiffDISPipeline.__call__

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffDISPipeline, "__call__", flaky)
    assert cli(official_tiny, str(tmp_path), "--output", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "1.png" in failed[0] and reason in failed[0] and "details" not in err
    assert summary(err).startswith("2 written, 0 already done, 1 failed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "2.png"]


def test_damaged_weights_giving_nan_fail_each_image_in_one_line(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file, save_file

    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, str(weights))
    for i in range(2):
        noise_image(16, 16, seed=i).save(tmp_path / f"{i}.png")
    assert main([str(tmp_path / "*.png"), "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir),
                 *ROOT_ARGS]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 2 and all("NaN" in line for line in failed) and "Traceback" not in err
    assert not (tmp_path / "out" / "0.png").exists()  # no empty cutout


def test_output_problems_are_found_before_the_model_loads(tmp_path, official_tiny, capsys, no_model):
    noise_image(16, 16).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("in the way")
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(tmp_path / "file" / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user who can write anywhere")
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(locked)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write there" in err[0]


def test_write_error_for_one_image_is_one_line_and_the_rest_go_on(tmp_path, official_tiny, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    noise_image(16, 16).save(src / "top.png")
    noise_image(16, 16, seed=1).save(src / "sub" / "deep.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the mirrored folder should go")
    assert cli(official_tiny, str(src), "--recursive", "--output", str(out)) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "deep.png" in failed[0] and "sub" in failed[0]
    assert (out / "top.png").is_file()


def test_recursive_mirrors_the_input_tree(tmp_path, official_tiny, capsys):
    src = tmp_path / "shoot"
    for folder in ("a", "b", "b/c"):
        (src / folder).mkdir(parents=True)
        noise_image(16, 16).save(src / folder / "x.jpg")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert cli(official_tiny, str(src), "--recursive", "--output", str(out)) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/x.png", "b/c/x.png", "b/x.png"]
    err = capsys.readouterr().err
    assert "notes.txt" in err  # named, not a failure
    # Without --recursive the folder has no images of its own: named, exit 1.
    assert cli(official_tiny, str(src), "--output", str(tmp_path / "flat")) == 1
    assert "--recursive" in capsys.readouterr().err
    # An output folder inside the input tree is not searched: a re-run is all done.
    inside = src / "cutouts"
    assert cli(official_tiny, str(src), "--recursive", "--output", str(inside)) == 0
    capsys.readouterr()
    assert cli(official_tiny, str(src), "--recursive", "--output", str(inside)) == 0
    assert summary(capsys.readouterr().err).startswith("0 written, 3 already done")


def test_input_alpha_is_ignored_by_default_and_kept_on_request(tmp_path, official_tiny):
    pixels = np.asarray(noise_image(16, 16)).copy()
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255
    alpha[:4] = 128
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(tmp_path / "a.png")
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(tmp_path / "plain"), "--save-mask") == 0
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(tmp_path / "kept"), "--save-mask",
               "--keep-input-alpha", "--no-refine-foreground") == 0
    mask = np.asarray(Image.open(tmp_path / "plain" / "a_mask.png")).astype(np.uint32)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "a.png"))[..., 3], mask)
    kept = np.asarray(Image.open(tmp_path / "kept" / "a.png"))
    assert np.array_equal(kept[..., 3], ((mask * alpha + 127) // 255).astype(np.uint8))
    assert np.array_equal(kept[..., :3], pixels)
    # The mask is the prediction either way; a cutout with multiplied alpha is not a source for it.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "kept" / "a_mask.png")), mask)
    assert result_info(tmp_path / "kept" / "a.png")["alpha"] != result_info(tmp_path / "plain" / "a.png")["alpha"]


def test_pixel_budget_refuses_from_the_header(tmp_path, official_tiny, capsys):
    Image.new("1", (3000, 2000)).save(tmp_path / "big.png")  # 6 megapixels, a few hundred bytes
    noise_image(16, 16).save(tmp_path / "small.png")
    assert cli(official_tiny, str(tmp_path), "--output", str(tmp_path / "out"), "--max-megapixels", "5") == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "big.png" in line)
    assert "3000x2000" in line and "--max-megapixels 6" in line
    assert (tmp_path / "out" / "small.png").is_file()


def test_default_pixel_budget_follows_from_the_available_memory(tmp_path, official_tiny, capsys, monkeypatch):
    """Without --max-megapixels the budget is the available memory (read once the model is loaded) over the
    default path's bytes a pixel, in whole megapixels; 128 where the memory cannot be read."""
    from diffdis_core import cli as cli_module
    from diffdis_core.image_io import DEFAULT_PATH_BYTES_PER_PIXEL, available_memory, default_max_pixels

    assert default_max_pixels(10 * 2**30) == 10 * 2**30 // DEFAULT_PATH_BYTES_PER_PIXEL // 10**6 * 10**6
    assert default_max_pixels(7_999_999 * DEFAULT_PATH_BYTES_PER_PIXEL) == 7_000_000
    assert default_max_pixels(1000) == 1_000_000 and default_max_pixels(None) == 128_000_000
    assert available_memory() is None or available_memory() > 0
    Image.new("1", (3000, 2000)).save(tmp_path / "big.png")  # 6 megapixels
    noise_image(16, 16).save(tmp_path / "small.png")
    monkeypatch.setattr(cli_module, "available_memory", lambda: 5_500_000 * DEFAULT_PATH_BYTES_PER_PIXEL)
    assert cli(official_tiny, str(tmp_path), "--output", str(tmp_path / "out")) == 1
    line = next(line for line in capsys.readouterr().err.splitlines() if "big.png" in line)
    assert "budget of 5;" in line and "--max-megapixels 6" in line
    assert (tmp_path / "out" / "small.png").is_file()
    monkeypatch.setattr(cli_module, "available_memory", lambda: 6_000_000 * DEFAULT_PATH_BYTES_PER_PIXEL)
    assert cli(official_tiny, str(tmp_path), "--output", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "big.png").is_file()


def test_symlink_loops_and_dangling_links_in_globs(tmp_path):
    root = tmp_path / "loop"
    (root / "a").mkdir(parents=True)
    noise_image(4, 4).save(root / "top.jpg")
    noise_image(4, 4).save(root / "a" / "inner.jpg")
    os.symlink(root, root / "a" / "back")  # loop/a/back -> loop
    os.symlink(root / "nowhere.jpg", root / "a" / "dangling.jpg")
    started = time.perf_counter()
    found = collect_inputs([str(root / "**" / "*.jpg")], recursive=False)
    assert time.perf_counter() - started < 5
    assert sorted(job.name.as_posix() for job in found.jobs) == ["a/inner", "top"]
    assert any("dangling.jpg" in line for line in found.failures)
    assert any("back" in line and "links back" in line for line in found.notes)
    found = collect_inputs([str(root)], recursive=True)
    assert sorted(job.name.as_posix() for job in found.jobs) == ["a/inner", "top"]


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "tests/fixture/official_tiny"], "did you mean"),
    (["--resolution", "100"], "--processing-res must be a multiple of 64"),
    (["--processing-res", "100"], "--processing-res must be a multiple of 64"),
    (["--ensemble", "0"], "--ensemble-size/--ensemble: 0 must be >= 1"),
    (["--device", "nosuchdevice"], "not usable"),
    (["--max-megapixels", "-1"], "max-megapixels"),
    (["--max-megapixels", "inf"], "--max-megapixels: 'inf' is not a finite number"),
    (["--max-megapixels", "nan"], "--max-megapixels: 'nan' is not a finite number"),
    (["--seed", str(2**64)], f"--seed: {2**64} must be <= {2**64 - 1}"),
    (["--seed", "1.5"], "--seed: '1.5' is not a whole number"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, official_tiny, capsys, monkeypatch, args, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("sent to the Hub"))
    monkeypatch.chdir(ROOT)
    noise_image(8, 8).save(tmp_path / "a.png")
    code = main([str(tmp_path / "a.png"), "--output", str(tmp_path / "out"), "--model", str(official_tiny),
                 "--base", "none", "--resolution", "64", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_old_option_names_are_aliases_of_the_pipelines(tmp_path, official_tiny, capsys):
    """--resolution and --ensemble (the names before the pipeline's) still work as --processing-res and
    --ensemble-size: the same cutout, and a run with the other names finds it done with the same settings."""
    noise_image(24, 20).save(tmp_path / "a.png")
    image, model = str(tmp_path / "a.png"), ["--model", str(official_tiny), "--base", "none"]
    old = ["--resolution", "64", "--ensemble", "2"]
    new = ["--processing-res", "64", "--ensemble-size", "2"]
    assert main([image, "--output", str(tmp_path / "old"), *model, *old]) == 0
    assert main([image, "--output", str(tmp_path / "new"), *model, *new]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "old" / "a.png")),
                          np.asarray(Image.open(tmp_path / "new" / "a.png")))
    single = np.asarray(Image.open(tmp_path / "old" / "a.png"))
    capsys.readouterr()
    assert main([image, "--output", str(tmp_path / "old"), *model, *new]) == 0
    err = capsys.readouterr().err
    assert summary(err).startswith("0 written, 1 already done") and "other settings" not in err
    assert main([image, "--output", str(tmp_path / "one"), *model, "--processing-res", "64"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "one" / "a.png")), single)  # the 2 draws counted


def test_offline_hub_error_names_the_option_and_the_files(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    noise_image(8, 8).save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: --model qianyu1217/diffdis: could not get") and "LocalEntryNotFound" in err[0]
    assert len(err) <= 10 and any("hf download qianyu1217/diffdis" in line for line in err)
    assert any(line.strip() == "unet/: config.json, diffusion_pytorch_model.safetensors" for line in err)
    assert not any("empty_text_embed" in line for line in err)  # neither repo has it


def test_entry_points():
    result = subprocess.run([sys.executable, "-m", "diffdis_core", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--save-edge" in result.stdout and result.stdout.startswith("usage: diffdis ")


LAUNCH_WRAPPER = """
import os, sys
from diffdis_core import cli

original = cli.Worker.__call__

def logged(self, task):
    with open(os.environ["DIFFDIS_TEST_LOG"], "a") as log:
        log.write(f"{os.environ.get('RANK')} {task.job.source.name}\\n")
    return original(self, task)

cli.Worker.__call__ = logged
sys.exit(cli.main())
"""


def test_two_processes_share_the_images(tmp_path, official_tiny):
    """accelerate launch --multi_gpu --num_processes 2 on a CPU machine: a gloo run, each image once."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        noise_image(12 + i, 20, seed=i).save(src / f"{i}.png")
    (tmp_path / "launch.py").write_text(LAUNCH_WRAPPER)
    args = [str(src), "--model", str(official_tiny), *ROOT_ARGS, "--dtype", "fp32", "--seed", "7"]
    env = {**os.environ, "DIFFDIS_TEST_LOG": str(tmp_path / "log"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "launch.py"),
                             *args, "--output", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    assert sorted(name for _, name in log) == [f"{i}.png" for i in range(5)]  # each image exactly once
    assert {rank for rank, _ in log} == {"0", "1"}
    assert summary(result.stderr).startswith("5 written, 0 already done, 0 failed")

    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    for i in range(5):
        one = np.asarray(Image.open(tmp_path / "one" / f"{i}.png")).astype(int)
        two = np.asarray(Image.open(tmp_path / "two" / f"{i}.png")).astype(int)
        assert np.abs(one - two).max() <= 1


@pytest.mark.parametrize("height, width", [(300, 200), (200, 300), (40, 30), (70, 500), (64, 64)])
def test_masks_are_enlarged_in_bands_with_the_pipelines_numbers(monkeypatch, height, width):
    """The CLI brings masks to full size in bands, straight to 8 bits: the same numbers as one
    bilinear resize (antialiased when shrinking) of the whole float map."""
    import torch.nn.functional as F

    from diffdis_core import image_io

    monkeypatch.setattr(image_io, "BAND_ELEMENTS", 3000)  # many bands even for small images
    small = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    shrink = height < 64 or width < 64
    whole = F.interpolate(small[None, None], size=(height, width), mode="bilinear", align_corners=False,
                          antialias=shrink)
    expected = (whole[0, 0].clamp(0, 1) * 255).round().numpy()
    banded = image_io.map_to_uint8(small, (height, width)).astype(np.float32)
    assert np.abs(banded - expected).max() <= 1 and (banded == expected).mean() > 0.99


def test_one_pixel_wide_masks_resize_like_their_wider_copies(monkeypatch):
    from diffdis_core import image_io

    monkeypatch.setattr(image_io, "BAND_ELEMENTS", 3000)
    small = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    narrow = image_io.map_to_uint8(small[:, :1], (300, 1))
    wide = image_io.map_to_uint8(small[:, :1].expand(64, 2), (300, 2))
    assert np.array_equal(narrow[:, 0], wide[:, 0])


def test_cutouts_are_refined_by_default(tmp_path, official_tiny):
    """Large images: the mask follows the image's edges; soft alpha: the foreground's own colours."""
    from diffdis_core import estimate_foreground, refine_alpha
    from diffdis_core.image_io import map_to_uint8

    noise_image(150, 120, seed=4).save(tmp_path / "big.png")  # larger than the processing size (64)
    assert cli(official_tiny, str(tmp_path / "big.png"), "--output", str(tmp_path / "refined"), "--save-mask",
               "--dtype", "fp32") == 0
    assert cli(official_tiny, str(tmp_path / "big.png"), "--output", str(tmp_path / "plain"), "--save-mask",
               "--dtype", "fp32", "--no-refine-edges", "--no-refine-foreground") == 0
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "big.png")))
    colours = pixels.permute(2, 0, 1)[None].float() / 255
    square = pipe(pixels.permute(2, 0, 1)[None], processing_res=64, generator=torch.Generator().manual_seed(0),
                  decode_edge=False, output_size=False).mask
    refined_mask = np.array(Image.open(tmp_path / "refined" / "big_mask.png"))
    plain_mask = np.asarray(Image.open(tmp_path / "plain" / "big_mask.png"))
    assert np.array_equal(refined_mask, map_to_uint8(refine_alpha(colours, square)))
    assert np.array_equal(plain_mask, map_to_uint8(square, (150, 120)))
    assert np.abs(refined_mask.astype(int) - plain_mask).max() > 2
    refined = np.asarray(Image.open(tmp_path / "refined" / "big.png"))
    foreground = estimate_foreground(colours, refine_alpha(colours, square))  # under the alpha before rounding
    expected = (foreground[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    # The command line refines the 8-bit image in bands (its alpha equal up to float rounding): a grey level.
    assert np.abs(refined[..., :3].astype(int) - expected).max() <= 1
    assert np.array_equal(refined[..., 3], refined_mask)
    plain = np.asarray(Image.open(tmp_path / "plain" / "big.png"))
    assert np.array_equal(plain[..., :3], pixels.numpy())
    assert not np.array_equal(refined[..., :3], plain[..., :3])


def test_compile_option_compiles_the_model_and_keeps_the_cutout(tmp_path, official_tiny, monkeypatch):
    """--compile: torch.compile'd UNet and VAE (traced with the eager backend here, so no compiler is
    needed) write the same cutout."""
    noise_image(40, 32).save(tmp_path / "photo.png")
    common = (str(tmp_path / "photo.png"), "--dtype", "fp32", "--no-refine-foreground")
    assert cli(official_tiny, *common, "--output", str(tmp_path / "plain")) == 0
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    assert cli(official_tiny, *common, "--output", str(tmp_path / "compiled"), "--compile") == 0
    assert len(compiled) == 3  # the UNet, the VAE encoder and decoder
    plain = np.asarray(Image.open(tmp_path / "plain" / "photo.png")).astype(int)
    assert np.abs(np.asarray(Image.open(tmp_path / "compiled" / "photo.png")).astype(int) - plain).max() <= 1


def test_compile_without_a_compiler_is_one_line_before_any_weights_load(tmp_path, official_tiny, monkeypatch,
                                                                        capsys):
    from diffdis_core import devices, pipeline

    noise_image(16, 16).save(tmp_path / "photo.png")
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.setattr(pipeline, "read_unet_state_dict", lambda *a, **k: pytest.fail("the weights were read"))
    assert cli(official_tiny, str(tmp_path / "photo.png"), "--output", str(tmp_path / "out"), "--dtype", "fp32",
               "--compile") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile on the CPU needs a C++ compiler" in err[0] and "turn compile off" in err[0]


# ---------------------------------------------------------------------------------------------- resuming safely
def test_a_result_of_another_input_with_the_same_name_is_never_taken_for_done(tmp_path, official_tiny, capsys):
    """Cameras repeat names: day2/IMG_0001.jpg is another picture than day1/IMG_0001.jpg."""
    for day, seed in (("day1", 1), ("day2", 2)):
        (tmp_path / day).mkdir()
        noise_image(16, 24, seed=seed).save(tmp_path / day / "IMG_0001.jpg")
    out = tmp_path / "cut"
    assert cli(official_tiny, str(tmp_path / "day1"), "--output", str(out)) == 0
    capsys.readouterr()
    day1 = (out / "IMG_0001.png").read_bytes()
    assert cli(official_tiny, str(tmp_path / "day2"), "--output", str(out)) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "day2/IMG_0001.jpg" in failed[0] and "another input" in failed[0]
    assert str(tmp_path / "day1" / "IMG_0001.jpg") in failed[0] and "--output" in failed[0]
    assert summary(err).startswith("0 written, 0 already done, 1 failed")
    assert (out / "IMG_0001.png").read_bytes() == day1  # nothing overwritten

    # A copy of the same picture elsewhere (a moved folder, a second card) is the same input: done.
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "day1" / "IMG_0001.jpg", tmp_path / "copy")
    assert cli(official_tiny, str(tmp_path / "copy"), "--output", str(out)) == 0
    assert summary(capsys.readouterr().err).startswith("0 written, 1 already done")

    # The input itself changed (edited in place): its result is redone, like make does.
    noise_image(16, 24, seed=3).save(tmp_path / "day1" / "IMG_0001.jpg")
    assert cli(official_tiny, str(tmp_path / "day1"), "--output", str(out)) == 0
    assert summary(capsys.readouterr().err).startswith("1 written (1 redone: 1 input changed), 0 already done")
    assert (out / "IMG_0001.png").read_bytes() != day1
    assert result_info(out / "IMG_0001.png")["input"]["path"] == os.path.realpath(tmp_path / "day1" / "IMG_0001.jpg")


def test_an_incomplete_or_unrecorded_result_is_redone(tmp_path, official_tiny, capsys):
    from diffdis_core.image_io import save_image

    for i in range(3):
        noise_image(16, 24, seed=i).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    args = [str(tmp_path / "*.png"), "--output", str(out), "--save-mask"]
    assert cli(official_tiny, *args) == 0
    capsys.readouterr()
    whole = (out / "0.png").read_bytes()
    (out / "0.png").write_bytes(whole[:len(whole) * 2 // 3])  # the header (and its record) intact
    assert result_info(out / "0.png") is not None
    info = result_info(out / "1_mask.png")  # as a version that did not record the input wrote it
    del info["input"], info["size"]
    save_image(Image.open(out / "1_mask.png"), out / "1_mask.png", info)
    assert cli(official_tiny, *args) == 0
    line = summary(capsys.readouterr().err)
    assert line.startswith("2 written (2 redone: 1 result incomplete, 1 made by an older version), 1 already done")
    assert (out / "0.png").read_bytes() == whole  # the same input and settings give the same result
    assert "input" in result_info(out / "1_mask.png")


def test_two_runs_on_one_folder_both_finish_with_whole_files(tmp_path, official_tiny):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        noise_image(40, 48, seed=i).save(src / f"{i}.png")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "diffdis_core", str(src), "--output", str(out), "--save-mask", "--save-edge",
            "--model", str(official_tiny), *ROOT_ARGS, "--overwrite"]  # both write every file
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    old = os.umask(0o022)
    try:
        runs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
        errors = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        os.umask(old)
    for run, err in zip(runs, errors):
        assert run.returncode == 0 and "Traceback" not in err, err
        assert summary(err).startswith("6 written")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i}{suffix}.png" for i in range(6) for suffix in ("", "_mask", "_edge"))  # no temporaries
    for name in names:
        assert is_whole_png(out / name) and result_info(out / name)["kind"] in ("cutout", "mask", "edge"), name
        Image.open(out / name).load()
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name  # as the umask says, not 0600


def test_a_link_planted_at_a_temporary_name_is_left_untouched(tmp_path, official_tiny, monkeypatch):
    from diffdis_core import files

    noise_image(16, 16).save(tmp_path / "a.jpg")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    prefix, suffix = files.temporary_name_pattern(out / "a.png")
    planted = [out / ".a.png.tmp", out / f"{prefix}fixed{suffix}"]  # the old fixed name, and a drawn one
    for link in planted:
        link.symlink_to(victim)
    names = iter(["fixed", "fixed", *(f"other{i}" for i in range(100))])  # the planted name is drawn first
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    assert cli(official_tiny, str(tmp_path / "a.jpg"), "--output", str(out)) == 0
    assert victim.read_text() == "keep me" and all(link.is_symlink() for link in planted)
    assert is_whole_png(out / "a.png")


def test_overwrite_never_replaces_an_input_through_a_linked_subfolder(tmp_path, official_tiny, capsys):
    shoot = tmp_path / "shoot"
    (shoot / "sub").mkdir(parents=True)
    noise_image(16, 16).save(shoot / "top.png")
    noise_image(16, 16, seed=1).save(shoot / "sub" / "a.png")
    before = (shoot / "sub" / "a.png").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(shoot / "sub")  # out/sub/a.png is the input itself
    for extra in ([], ["--overwrite"]):
        assert cli(official_tiny, str(shoot), "--recursive", "--output", str(out), *extra) == 1
        err = capsys.readouterr().err
        line = next(line for line in err.splitlines() if "a.png" in line)
        assert "would overwrite an input" in line and "--overwrite" not in line
        assert (shoot / "sub" / "a.png").read_bytes() == before
    assert (out / "top.png").is_file()
    # A hard link to an input in the output folder is the input too.
    os.link(shoot / "top.png", tmp_path / "top.png")
    top = (shoot / "top.png").read_bytes()
    assert cli(official_tiny, str(shoot / "top.png"), "--output", str(tmp_path), "--overwrite") == 1
    assert "would overwrite an input" in capsys.readouterr().err and (shoot / "top.png").read_bytes() == top


class Hung(BaseException):
    """Raised by the alarm: no `except Exception` in the CLI can swallow it."""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_among_the_inputs_is_skipped_and_the_batch_ends(tmp_path, official_tiny, capsys):
    import signal

    noise_image(16, 16).save(tmp_path / "good.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "named.png")

    def hung(*args):
        raise Hung("the run blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        code = cli(official_tiny, str(tmp_path), str(tmp_path / "named.png"), "--output", str(tmp_path / "out"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert code == 1
    for name in ("pipe.jpg", "named.png"):
        lines = [line for line in err.splitlines() if name in line]
        assert len(lines) == 1 and "FIFO" in lines[0] and lines[0].startswith("skipped"), err
    assert summary(err).startswith("1 written, 0 already done, 2 failed")


def test_nan_pixels_in_a_float_image_are_named_as_the_inputs_problem(tmp_path, official_tiny, capsys):
    pixels = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    pixels[3, 4:7] = np.nan
    Image.fromarray(pixels, "F").save(tmp_path / "depth.tif")
    noise_image(16, 16).save(tmp_path / "good.png")
    assert cli(official_tiny, str(tmp_path), "--output", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "depth.tif" in failed[0] and "3 of its pixels are NaN" in failed[0]
    assert "weights" not in err and (tmp_path / "out" / "good.png").is_file()


def test_a_link_made_after_planning_still_never_lets_a_result_replace_an_input(tmp_path, official_tiny, capsys,
                                                                              monkeypatch):
    """The resolved target is checked again as it is written: a folder swapped for a link meanwhile
    (another program, a concurrent run) is caught."""
    from diffdis_core import cli as cli_module

    shoot = tmp_path / "shoot"
    (shoot / "sub").mkdir(parents=True)
    noise_image(16, 16, seed=1).save(shoot / "sub" / "a.png")
    before = (shoot / "sub" / "a.png").read_bytes()
    out = tmp_path / "out"
    planned = cli_module.plan_tasks

    def plan_then_link(*args, **kwargs):
        tasks = planned(*args, **kwargs)
        (out / "sub").symlink_to(shoot / "sub")
        return tasks

    monkeypatch.setattr(cli_module, "plan_tasks", plan_then_link)
    assert cli(official_tiny, str(shoot), "--recursive", "--output", str(out), "--overwrite") == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "a.png" in failed[0] and "would overwrite an input" in failed[0]
    assert (shoot / "sub" / "a.png").read_bytes() == before


def test_a_setting_redoes_only_the_results_that_depend_on_it(tmp_path, official_tiny, capsys):
    pixels = np.asarray(noise_image(16, 16)).copy()
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:8] = 0
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = [str(tmp_path / "a.png"), "--output", str(out), "--save-mask", "--save-edge"]
    assert cli(official_tiny, *args) == 0
    capsys.readouterr()
    mask, edge = (out / "a_mask.png").read_bytes(), (out / "a_edge.png").read_bytes()
    # --keep-input-alpha changes the cutout only: it alone is redone (from its own model run).
    assert cli(official_tiny, *args, "--keep-input-alpha") == 0
    assert summary(capsys.readouterr().err).startswith("1 written (1 redone: 1 other settings)")
    assert np.asarray(Image.open(out / "a.png"))[:8, :, 3].max() == 0
    assert (out / "a_mask.png").read_bytes() == mask and (out / "a_edge.png").read_bytes() == edge
    # The masks and edges do not depend on how the cutout's colours are made.
    assert cli(official_tiny, *args, "--keep-input-alpha", "--no-refine-foreground") == 0
    capsys.readouterr()
    assert (out / "a_mask.png").read_bytes() == mask and (out / "a_edge.png").read_bytes() == edge
    assert result_info(out / "a.png")["settings"]["refine_foreground"] is False


def test_an_input_that_cannot_be_read_for_its_fingerprint_is_one_line(tmp_path):
    from diffdis_core.cli import Source

    with pytest.raises(DiffDISError, match="cannot read it"):
        Source(str(tmp_path), 0, 0).sha256()  # a folder: opens, but reading fails like an unreadable file
