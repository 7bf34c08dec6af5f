"""training/evaluate.py: inference with the paper's settings, scoring, saved maps, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate as evaluate_script
from training.data import load_rgb
from training.evaluate import predict_maps, protocol_input, protocol_map
from training.synthetic import make_dataset, make_split

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"Fmax", "Fw", "Em", "Sm", "MAE", "HCE", "images"}


@pytest.fixture(scope="module")
def dis5k(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dis5k"), train=1, val=3)


def evaluate(*argv):
    return evaluate_script.main([str(a) for a in argv])


def test_model_scores_and_saved_maps_rescore_the_same(official_tiny, tiny_pipeline, dis5k, tmp_path, capsys):
    preds, scores = tmp_path / "preds", tmp_path / "scores.json"
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", dis5k, "--split", "DIS-VD",
                    "--resolution", 64, "--no-tta", "--seed", 7, "--save-pred", preds, "--json", scores) == 0
    table = capsys.readouterr().out
    assert "| set | Fβmax | Fβw | Eφm | Sm | MAE | HCE | images |" in table and "| DIS-VD |" in table
    figures = json.loads(scores.read_text())
    assert set(figures) == {"DIS-VD"} and set(figures["DIS-VD"]) == KEYS and figures["DIS-VD"]["images"] == 3

    # The saved map (8-bit grey PNG, in the authors' <split>/mask/ layout) is the pipeline's output for
    # that image and seed, through the protocol: PIL bilinear to 64², × 255 truncated, PIL bilinear back.
    image_path = sorted((dis5k / "DIS-VD" / "im").iterdir())[0]
    saved = Image.open(preds / "DIS-VD" / "mask" / f"{image_path.stem}.png")
    image = load_rgb(image_path)
    assert saved.mode == "L" and saved.size == image.size
    soft = tiny_pipeline(image.resize((64, 64), Image.Resampling.BILINEAR), processing_res=64,
                         generator=torch.Generator().manual_seed(7), decode_edge=False).mask[0, 0].numpy()
    levels = Image.fromarray(np.floor(np.clip(soft, 0, 1) * 255).astype(np.uint8))
    expected = np.asarray(levels.resize(image.size, Image.Resampling.BILINEAR), np.int16)
    assert np.abs(np.asarray(saved, np.int16) - expected).max() <= 1

    # What was scored is what was saved: rescoring the files gives the same figures.
    rescored = tmp_path / "rescored.json"
    assert evaluate("--pred", preds, "--dataset", dis5k, "--split", "DIS-VD", "--json", rescored) == 0
    again = json.loads(rescored.read_text())["DIS-VD"]
    for key in ("Fmax", "Fw", "Em", "Sm", "MAE", "HCE"):
        assert again[key] == pytest.approx(figures["DIS-VD"][key], rel=1e-9, abs=1e-12)


def test_soft_maps_16_bit_edges_and_a_plain_folder(official_tiny, dis5k, tmp_path, capsys):
    folder = dis5k / "DIS-VD"
    preds = tmp_path / "preds"
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", folder, "--resolution", 64, "--no-tta",
                    "--max-images", 2, "--soft", "--no-hce", "--pred-bits", 16, "--save-pred", preds, "--save-edge",
                    "--json", tmp_path / "s.json") == 0
    assert "mean Eφ" in capsys.readouterr().out
    figures = json.loads((tmp_path / "s.json").read_text())["DIS-VD"]
    assert figures["images"] == 2 and "HCE" not in figures
    for kind in ("mask", "edge"):
        maps = sorted((preds / "DIS-VD" / kind).iterdir())
        assert [p.suffix for p in maps] == [".png", ".png"]
        assert all(Image.open(p).mode == "I;16" for p in maps)
    # Saved maps are never replaced unasked.
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", folder, "--resolution", 64,
                    "--no-tta", "--max-images", 1, "--save-pred", preds) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_unreadable_image_is_named_in_one_line(official_tiny, tmp_path, capsys):
    make_split(tmp_path, 2)
    bad = sorted((tmp_path / "im").iterdir())[1]
    bad.write_bytes(b"not a jpeg")
    # Loaded in a DataLoader worker, whose errors come back carrying the worker's traceback.
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", tmp_path, "--resolution", 64,
                    "--no-tta", "--no-hce", "--num-workers", 1) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"error: {bad}: unreadable image")


def test_missing_predictions_are_named(dis5k, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = dis5k / "DIS-VD" / "gt"
    first = sorted(gt.iterdir())[0]
    Image.open(first).save(pred / first.name)
    assert evaluate("--pred", pred, "--gt", gt) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 of 3 ground truths" in err


@pytest.mark.parametrize("argv, message", [
    (["--pred", "x", "--model", "y"], "not both"),
    (["--pred", "x"], "--pred needs --gt"),
    (["--model", "y"], "give --dataset"),
    (["--model", "y", "--dataset", ".", "--resolution", "300"],  # the old name, still accepted
     "--processing-res must be a multiple of 256 from 256 to 4096 with TTA"),
    (["--model", "y", "--dataset", ".", "--processing-res", "300"],
     "--processing-res must be a multiple of 256 from 256 to 4096 with TTA"),
    (["--model", "y", "--dataset", ".", "--resolution", "96", "--no-tta"], "multiple of 64"),
    (["--model", "y", "--dataset", ".", "--save-edge"], "--save-edge needs --save-pred"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert evaluate(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--max-images", "0"), ("--num-workers", "-1"), ("--seed", "nan"), ("--processing-res", "1e3"),
])
def test_bad_numbers_are_refused_as_they_are_parsed(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate("--model", "y", "--dataset", ".", option, value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {option}") and value in err[0]


def test_the_json_figures_are_written_whole_and_readable_as_the_umask_says(dis5k, tmp_path, capsys):
    target = tmp_path / "figures.json"
    target.write_text("old")
    target.chmod(0o600)
    pred = tmp_path / "pred"
    pred.mkdir()
    gt = dis5k / "DIS-VD" / "gt"
    for mask in gt.iterdir():
        Image.open(mask).save(pred / mask.name)
    assert evaluate("--pred", pred, "--gt", gt, "--no-hce", "--json", target) == 0
    assert json.loads(target.read_text())["pred"]["images"] == 3
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # a new file, not the old one rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json", "pred"]  # no temporary left


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_missing_split_from_the_script(tmp_path):
    make_split(tmp_path / "DIS-VD", 1)
    result = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", "unused",
                             "--dataset", str(tmp_path), "--split", "DIS-TE9"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no split DIS-TE9/" in lines[0] and "DIS-VD" in lines[0]


# The authors' own run_inference.py on the tiny model (tests/fixtures/official_tiny_modes/README.md).
MODES = ROOT / "tests" / "fixtures" / "official_tiny_modes"


@pytest.fixture(scope="module")
def modes():
    from safetensors.torch import load_file

    case = json.loads((MODES / "case.json").read_text())
    return case, load_file(MODES / "expected.safetensors"), load_file(MODES / "noises.safetensors")


def grey_levels_apart(a, b):
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))


def test_protocol_input_and_output_are_the_authors(modes):
    case, expected, _ = modes
    image = Image.open(MODES / case["image"]).convert("RGB")
    res = case["processing_res"]
    assert np.array_equal(np.asarray(protocol_input(image, res)),
                          np.asarray(Image.open(MODES / case["image_at_processing_res"]).convert("RGB")))
    # Their averaged TTA map at 256² -> to_pil (× 255, truncated) -> PIL bilinear to 300×200: what they save.
    for kind in ("mask", "edge"):
        saved = protocol_map(expected[f"tta_{kind}_square"].numpy(), image.size)
        assert saved.dtype == np.uint8 and saved.shape == (case["height"], case["width"])
        apart = grey_levels_apart(saved, expected[f"tta_{kind}_final_u8"].numpy())
        assert apart.max() <= 1 and (apart == 0).mean() >= 0.999


def test_evaluation_reproduces_the_maps_the_authors_save(official_tiny, modes):
    from diffdis_core import DiffDISPipeline

    case, expected, noises = modes
    pipe = DiffDISPipeline.from_pretrained(official_tiny, base=None)
    image = Image.open(MODES / case["image"]).convert("RGB")
    # Their noises, replayed: one per TTA view (views in the pipeline's order, one draw each).
    latents = [noises[f"tta_{int(flip)}_{scale}"] for flip, scale in pipe.tta_views]
    masks, edges = predict_maps(pipe, [image], processing_res=case["processing_res"], tta=True, decode_edge=True,
                                latents=latents)
    for kind, maps in (("mask", masks), ("edge", edges)):
        apart = grey_levels_apart(maps[0], expected[f"tta_{kind}_final_u8"].numpy())
        assert (apart <= 1).mean() >= 0.999, f"{kind}: {(apart > 1).mean():.2%} of pixels over 1 grey level"
