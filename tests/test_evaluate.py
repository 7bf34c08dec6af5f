"""training/evaluate.py: inference with the paper's settings, scoring, saved maps, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate as evaluate_script
from training.data import load_rgb
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

    # The saved map is the pipeline's output for that image and seed (16-bit PNG by default).
    image_path = sorted((dis5k / "DIS-VD" / "im").iterdir())[0]
    saved = Image.open(preds / "DIS-VD" / f"{image_path.stem}.png")
    assert saved.mode.startswith("I;16") and saved.size == Image.open(image_path).size
    expected = tiny_pipeline(load_rgb(image_path), processing_res=64, generator=torch.Generator().manual_seed(7),
                             decode_edge=False).mask[0, 0].numpy()
    assert np.abs(np.asarray(saved, np.float64) / 65535 - expected).max() < 1e-4

    rescored = tmp_path / "rescored.json"
    assert evaluate("--pred", preds, "--dataset", dis5k, "--split", "DIS-VD", "--json", rescored) == 0
    again = json.loads(rescored.read_text())["DIS-VD"]
    for key in ("Fmax", "Fw", "Em", "Sm", "MAE", "HCE"):
        assert again[key] == pytest.approx(figures["DIS-VD"][key], abs=2e-3)


def test_tta_soft_maps_8_bit_and_a_plain_folder(official_tiny, dis5k, tmp_path, capsys):
    folder = dis5k / "DIS-VD"
    preds = tmp_path / "preds"
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", folder, "--resolution", 256,
                    "--max-images", 2, "--soft", "--no-hce", "--pred-bits", 8, "--save-pred", preds,
                    "--json", tmp_path / "s.json") == 0
    assert "mean Eφ" in capsys.readouterr().out
    figures = json.loads((tmp_path / "s.json").read_text())["DIS-VD"]
    assert figures["images"] == 2 and "HCE" not in figures
    assert sorted(p.suffix for p in (preds / "DIS-VD").iterdir()) == [".png", ".png"]
    assert Image.open(next((preds / "DIS-VD").iterdir())).mode == "L"
    # Saved maps are never replaced unasked.
    assert evaluate("--model", official_tiny, "--base", "none", "--dataset", folder, "--resolution", 64,
                    "--max-images", 1, "--save-pred", preds) == 2
    assert "--overwrite" in capsys.readouterr().err


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
    (["--model", "y", "--dataset", ".", "--resolution", "30"], "multiple of 8"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert evaluate(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_missing_split_from_the_script(tmp_path):
    make_split(tmp_path / "DIS-VD", 1)
    result = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", "unused",
                             "--dataset", str(tmp_path), "--split", "DIS-TE9"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no split DIS-TE9/" in lines[0] and "DIS-VD" in lines[0]
