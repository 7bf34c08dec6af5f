"""The command line: python -m diffdis_core INPUT... --output DIR."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffdis_core.cli import main
from diffdis_core.image_io import load_image

ROOT_ARGS = ["--base", "none", "--resolution", "64"]


def cli(official_tiny, *args):
    return main([*args, "--model", str(official_tiny), *ROOT_ARGS])


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_cutout_is_rgba_at_the_displayed_size(tmp_path, official_tiny, tiny_pipeline):
    image = noise_image(30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° for display
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert cli(official_tiny, str(tmp_path / "photo.jpg"), "--output", str(tmp_path / "out"), "--seed", "3",
               "--dtype", "fp32") == 0
    result = Image.open(tmp_path / "out" / "photo.png")
    assert result.mode == "RGBA" and result.size == (30, 50)  # width, height after rotation
    rgb = load_image(tmp_path / "photo.jpg")
    expected = tiny_pipeline(rgb[None], processing_res=64, generator=torch.Generator().manual_seed(3),
                             decode_edge=False).mask[0, 0]
    alpha = np.asarray(result)[..., 3].astype(np.float32) / 255
    assert np.abs(alpha - expected.numpy()).max() <= 1 / 255 + 1e-6
    assert np.array_equal(np.asarray(result)[..., :3], (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


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
    assert cli(official_tiny, str(src), "--output", str(tmp_path / "out"), "--save-mask", "--save-edge") == 0
    expected = {"gray": (20, 10), "alpha": (12, 14), "deep": (20, 15), "palette": (9, 9), "print": (16, 8),
                "web": (13, 21), "dot": (1, 1)}
    for stem, size in expected.items():
        assert Image.open(tmp_path / "out" / f"{stem}.png").size == size
        assert Image.open(tmp_path / "out" / f"{stem}_mask.png").mode == "L"
        assert Image.open(tmp_path / "out" / f"{stem}_edge.png").size == size


def test_sixteen_bit_input_keeps_its_range(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    assert torch.allclose(load_image(tmp_path / "white16.png"), torch.ones(3, 4, 4))


def test_broken_file_is_one_line_and_the_rest_still_run(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "cut.jpg").write_bytes(open(tmp_path / "good.png", "rb").read()[:40])
    code = cli(official_tiny, str(tmp_path / "*.*"), "--output", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert any("broken.png" in line and line.startswith("skipped") for line in err.splitlines())
    assert any("cut.jpg" in line and line.startswith("skipped") for line in err.splitlines())
    assert (tmp_path / "out" / "good.png").is_file()


def test_never_overwrites_an_input(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert cli(official_tiny, str(tmp_path / "a.png"), "--output", str(tmp_path), "--overwrite") == 1
    assert (tmp_path / "a.png").read_bytes() == before
    assert "would overwrite an input" in capsys.readouterr().err


def test_existing_results_need_overwrite(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "a.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the user's own file")
    assert cli(official_tiny, str(tmp_path / "a.jpg"), "--output", str(out)) == 1
    assert (out / "a.png").read_bytes() == b"the user's own file"
    assert "--overwrite" in capsys.readouterr().err
    assert cli(official_tiny, str(tmp_path / "a.jpg"), "--output", str(out), "--overwrite") == 0
    assert Image.open(out / "a.png").mode == "RGBA"


def test_same_stem_twice_is_refused_for_the_second(tmp_path, official_tiny, capsys):
    noise_image(16, 16).save(tmp_path / "x.png")
    noise_image(16, 16).save(tmp_path / "x.jpg")
    assert cli(official_tiny, str(tmp_path / "x.jpg"), str(tmp_path / "x.png"), "--output", str(tmp_path / "o")) == 1
    assert "same name" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--resolution", "100"], "multiple of 8"),
    (["--device", "nosuchdevice"], "not usable"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, official_tiny, capsys, args, message):
    noise_image(8, 8).save(tmp_path / "a.png")
    code = main([str(tmp_path / "a.png"), "--output", str(tmp_path / "out"), "--model", str(official_tiny),
                 "--base", "none", "--resolution", "64", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "diffdis_core", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--save-edge" in result.stdout
