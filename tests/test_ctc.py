"""Cell tracking challenge data: the layout, loading, the result format, and fetch over a local HTTP server."""
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import synthetic_ctc

from ronneberger2015 import ctc, data
from ronneberger2015.data import DataError
from ronneberger2015.metrics import seg


def _archive(path: Path, source: Path) -> str:
    """Zip ``source`` (a data set folder) as the challenge does, NAME/... inside; return the archive's sha256."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(source.rglob("*")):
            archive.write(file, file.relative_to(source.parent))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_location_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CTC_DIR", str(tmp_path / "env"))
    assert ctc.data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert ctc.data_dir() == tmp_path / "env"
    monkeypatch.delenv("CTC_DIR")
    assert ctc.data_dir() == Path("data/ctc")


def test_loads_the_annotated_frames_of_each_sequence(tmp_path):
    synthetic_ctc(tmp_path)
    assert ctc.sequences("PhC-C2DH-U373", tmp_path) == [("01", "GT"), ("02", "GT")]
    annotated = ctc.load("PhC-C2DH-U373", "02", tmp_path)
    assert annotated.frames == (0, 2) and annotated.truth == "GT"
    assert annotated.images.shape == annotated.labels.shape == (2, 96, 120)
    assert annotated.images.dtype == np.uint8 and annotated.labels.dtype == np.uint16
    assert set(np.unique(annotated.labels)) == {0, 1, 2, 3}  # the fourth cell is not annotated
    assert str(annotated) == "PhC-C2DH-U373 sequence 02: 2 frames with gold truth (manual)"


def test_silver_truth_where_no_gold_truth(tmp_path):
    folder = synthetic_ctc(tmp_path)
    (folder / "01_GT").rename(folder / "01_ST")
    assert ctc.sequences("PhC-C2DH-U373", tmp_path) == [("01", "ST"), ("02", "GT")]
    assert ctc.load("PhC-C2DH-U373", "01", tmp_path).truth == "ST"


def test_missing_and_broken_layouts_are_named(tmp_path):
    with pytest.raises(DataError, match="fetch ctc DIC-C2DH-HeLa") as error:
        ctc.sequences("DIC-C2DH-HeLa", tmp_path)
    assert "CTC_DIR" in str(error.value)
    folder = synthetic_ctc(tmp_path)
    (folder / "02" / "t002.tif").unlink()
    with pytest.raises(DataError, match=r"annotates frame\(s\) \[2\] but .* lacks t002.tif"):
        ctc.load("PhC-C2DH-U373", "02", tmp_path)
    for path in (folder / "01_GT" / "SEG").iterdir():
        path.rename(path.with_name(path.stem + "_000.tif"))
    with pytest.raises(DataError, match="3D truth"):
        ctc.load("PhC-C2DH-U373", "01", tmp_path)
    tifffile.imwrite(folder / "02_GT" / "SEG" / "man_seg000.tif", np.zeros((96, 120), np.float32))
    (folder / "02" / "t002.tif").write_bytes((folder / "02" / "t000.tif").read_bytes())
    with pytest.raises(DataError, match="integer cell ids"):
        ctc.load("PhC-C2DH-U373", "02", tmp_path)


def test_masks_are_written_in_the_result_format(tmp_path):
    masks = np.arange(2 * 4 * 5).reshape(2, 4, 5)
    paths = ctc.write_masks(tmp_path / "RES", [7, 1234], masks)
    assert [p.name for p in paths] == ["mask007.tif", "mask1234.tif"]
    written = tifffile.imread(paths[1])
    assert written.dtype == np.uint16 and (written == masks[1]).all()
    with pytest.raises(ValueError, match="0..65535"):
        ctc.write_masks(tmp_path, [0], np.full((1, 2, 2), 70000))


def test_fetch_installs_the_data_set(http_root, tmp_path):
    root, url = http_root
    digest = _archive(root / "PhC-C2DH-U373.zip", synthetic_ctc(tmp_path / "made"))
    target = tmp_path / "data" / "ctc"
    assert ctc.fetch("PhC-C2DH-U373", target, url=f"{url}/PhC-C2DH-U373.zip", sha256=digest) == target / "PhC-C2DH-U373"
    assert sorted(p.name for p in (target / "PhC-C2DH-U373").iterdir()) == ["01", "01_GT", "02", "02_GT"]
    assert [p.name for p in target.iterdir()] == ["PhC-C2DH-U373"]  # no temporary folder left
    np.testing.assert_array_equal(ctc.load("PhC-C2DH-U373", "01", target).labels,
                                  ctc.load("PhC-C2DH-U373", "01", tmp_path / "made").labels)


def test_a_different_archive_is_named_as_possibly_reissued(http_root, tmp_path):
    root, url = http_root
    digest = _archive(root / "x.zip", synthetic_ctc(tmp_path / "made"))
    with pytest.raises(DataError, match=f"re-issued .* nothing was installed. .* --sha256 {digest}"):
        ctc.fetch("PhC-C2DH-U373", tmp_path / "ctc", url=f"{url}/x.zip")
    assert not (tmp_path / "ctc").exists()


def test_fetch_refuses_an_archive_without_the_data_set(http_root, tmp_path):
    root, url = http_root
    digest = _archive(root / "x.zip", synthetic_ctc(tmp_path / "made", name="Fluo-N2DH-GOWT1"))
    with pytest.raises(DataError, match="no folder PhC-C2DH-U373/"):
        ctc.fetch("PhC-C2DH-U373", tmp_path / "ctc", url=f"{url}/x.zip", sha256=digest)
    assert not (tmp_path / "ctc").exists()


def test_command_line_fetches_ctc_and_still_isbi_by_default(http_root, tmp_path, monkeypatch, capsys):
    root, url = http_root
    _archive(root / "hela.zip", synthetic_ctc(tmp_path / "made", name="DIC-C2DH-HeLa"))
    monkeypatch.setenv("CTC_DIR", str(tmp_path / "env"))
    assert data.main(["fetch", "ctc", "DIC-C2DH-HeLa", "--url", f"{url}/hela.zip", "--sha256", "any"]) == 0
    assert (tmp_path / "env" / "DIC-C2DH-HeLa" / "02_GT" / "SEG" / "man_seg002.tif").is_file()
    assert data.main(["fetch", "ctc", "DIC-C2DH-HeLa", "--url", f"{url}/none.zip"]) == 0  # a valid copy is kept
    with pytest.raises(SystemExit):
        data.main(["fetch", "ctc"])
    assert "needs a data set name" in capsys.readouterr().err
    monkeypatch.setenv("ISBI2012_DIR", str(tmp_path / "isbi"))
    assert data.main(["fetch", "--url", f"{url}/none.zip"]) == 2  # no argument: the ISBI 2012 archive
    assert "ISBI2012_DIR" in capsys.readouterr().err


def test_the_shared_frames_load_and_score_one_against_themselves(ctc_dir):
    phc = ctc.load("PhC-C2DH-U373", "02", ctc_dir)
    assert phc.truth == "GT" and len(phc.frames) == 19 and phc.images.shape == (19, 520, 696)
    hela = ctc.load("DIC-C2DH-HeLa", "01", ctc_dir)
    assert hela.truth == "ST" and len(hela.frames) == 84 and hela.labels.dtype == np.uint16
    assert seg(phc.labels, phc.labels) == 1.0
