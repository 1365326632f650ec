"""The Table 2 replay: both directions end to end on a synthetic archive fetched over a local HTTP server."""
import hashlib
import json
import shutil
import zipfile

import numpy as np
import pytest
import tifffile
from conftest import synthetic_ctc

from reproduce import ctc as replay
from ronneberger2015 import data
from ronneberger2015.ctc import load

pytestmark = pytest.mark.filterwarnings("ignore::ronneberger2015.training.TrainingWarning")  # two iterations
QUICK = ["--preset", "smoke", "--iterations", "2", "--input-tile", "188", "--base-channels", "4", "--device", "cpu"]


def test_fetched_archive_replays_both_directions(http_root, tmp_path, capsys):
    root, url = http_root
    made = synthetic_ctc(tmp_path / "made")
    with zipfile.ZipFile(root / "PhC-C2DH-U373.zip", "w") as archive:
        for file in sorted(made.rglob("*")):
            archive.write(file, file.relative_to(made.parent))
    digest = hashlib.sha256((root / "PhC-C2DH-U373.zip").read_bytes()).hexdigest()
    folder = tmp_path / "ctc"
    assert data.main(["fetch", "ctc", "PhC-C2DH-U373", "--url", f"{url}/PhC-C2DH-U373.zip", "--sha256", digest,
                      "--data-dir", str(folder)]) == 0
    out = tmp_path / "run"
    assert replay.main(["PhC-C2DH-U373", "--data-dir", str(folder), "-o", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "u-net (2015) (paper, test set)" in printed and "0.9203" in printed and "Otsu + components, mean" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(d["train"], d["held_out"]) for d in metrics["directions"]] == [("01 t000-t002", "02 t000-t002"),
                                                                          ("02 t000-t002", "01 t000-t002")]
    assert metrics["mean"]["seg"] == pytest.approx(np.mean([d["seg"] for d in metrics["directions"]]))
    for sequence in ("01", "02"):
        masks = sorted(p.name for p in (out / f"{sequence}_RES").iterdir())
        assert masks == ["mask000.tif", "mask002.tif"]
        assert tifffile.imread(out / f"{sequence}_RES" / "mask000.tif").dtype == np.uint16
    assert {"checkpoint.pt", "best.pt", "config.json", "log.csv", "loss.png", "summary.json", "overlay-t000.png"} <= {
        p.name for p in (out / "train-01-t000-t002").iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["normalise"] == "stretch" and config["train"]["w0"] == 10 and config["train"]["sigma"] == 5
    log = (out / "train-01-t000-t002" / "log.csv").read_text().splitlines()
    assert "seg" in log[0].split(",")


def test_one_annotated_sequence_is_split_in_time(tmp_path, capsys):
    folder = synthetic_ctc(tmp_path, frames=8)
    shutil.rmtree(folder / "02")
    shutil.rmtree(folder / "02_GT")
    (folder / "01_GT").rename(folder / "01_ST")
    out = tmp_path / "run"
    assert replay.main(["PhC-C2DH-U373", "--data-dir", str(tmp_path), "-o", str(out), "--one-direction", *QUICK]) == 0
    assert "SILVER truth" in capsys.readouterr().out
    directions = json.loads((out / "metrics.json").read_text())["directions"]
    assert [(d["train"], d["held_out"], d["truth"]) for d in directions] == [("01 t000-t002", "01 t004-t006", "ST")]
    assert sorted(p.name for p in (out / "01_RES").iterdir()) == ["mask004.tif", "mask006.tif"]


def test_baseline_finds_bright_cells_and_merges_touching_ones(tmp_path):
    annotated = load("PhC-C2DH-U373", "01", synthetic_ctc(tmp_path).parent)
    result = replay.baseline(annotated, annotated)
    assert result["cells"] == "brighter"
    cells = replay.otsu_cells(annotated.images, True)
    touching = cells[0][annotated.labels[0] == 1]
    assert np.all(touching == cells[0][annotated.labels[0] == 2][0])  # cells 1 and 2 touch: one component
    assert 0.3 < result["seg"] < 1.0


def test_stretch_maps_each_frame_to_the_unit_interval():
    frames = np.stack([np.linspace(100, 120, 1000).reshape(20, 50), np.linspace(0, 255, 1000).reshape(20, 50)])
    stretched = replay.normalise(frames, "stretch")
    assert stretched.dtype == np.float32
    for frame in stretched:  # 0.5 % of the pixels at 0 and at 1, the rest spread linearly in between
        assert np.count_nonzero(frame == 0) == np.count_nonzero(frame == 1) == 5
        assert np.median(frame) == pytest.approx(0.5, abs=1e-6)
    assert replay.normalise(frames, "none") is frames


def test_missing_data_is_explained(tmp_path, capsys):
    assert replay.main(["DIC-C2DH-HeLa", "--data-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "python -m ronneberger2015.data fetch ctc DIC-C2DH-HeLa" in capsys.readouterr().err
