"""ISBI 2012 files: location order, checksums, corruption, and fetch over a local HTTP server."""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ronneberger2015 import data
from ronneberger2015.data import FILES, DataError, data_dir, fetch, load, load_isbi


def test_loads_verified_stacks(isbi):
    assert all(stack.shape == (30, 512, 512) and stack.dtype == np.uint8 for stack in isbi)
    assert set(np.unique(isbi.train_labels)) == {0, 255}


def test_location_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ISBI2012_DIR", str(tmp_path / "env"))
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("ISBI2012_DIR")
    assert data_dir() == Path("data/isbi2012")


def test_missing_data_names_both_ways(tmp_path):
    with pytest.raises(DataError) as error:
        load("train-volume.tif", tmp_path)
    message = str(error.value)
    assert "python -m ronneberger2015.data fetch" in message and "ISBI2012_DIR" in message


def _flipped(path):
    """The file's bytes with one byte inside the last page's pixels inverted."""
    with tifffile.TiffFile(path) as tiff:
        offset = tiff.pages[-1].dataoffsets[0] + 1000
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    return bytes(raw)


def test_rejects_one_flipped_byte(isbi_dir, tmp_path):
    (tmp_path / "train-labels.tif").write_bytes(_flipped(isbi_dir / "train-labels.tif"))
    with pytest.raises(DataError, match="does not match the published checksum"):
        load("train-labels.tif", tmp_path)


def test_rejects_truncated_file(isbi_dir, tmp_path):
    raw = (isbi_dir / "train-volume.tif").read_bytes()
    (tmp_path / "train-volume.tif").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DataError, match="train-volume.tif"):
        load("train-volume.tif", tmp_path)


def test_rejects_wrong_shape(tmp_path):
    tifffile.imwrite(tmp_path / "test-volume.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="expected a 30x512x512 uint8 stack"):
        load("test-volume.tif", tmp_path)


def _zip(path, isbi_dir):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name in FILES:
            archive.write(isbi_dir / name, f"ISBI-2012-challenge/{name}")
        archive.writestr("ISBI-2012-challenge/challenge-error-metrics.bsh", "// not used")


def test_fetch_installs_verified_files(isbi_dir, http_root, tmp_path):
    root, url = http_root
    _zip(root / "isbi.zip", isbi_dir)
    target = tmp_path / "data" / "isbi2012"
    assert fetch(target, url=f"{url}/isbi.zip") == target
    assert sorted(p.name for p in target.iterdir()) == sorted(FILES)
    np.testing.assert_array_equal(load_isbi(target).train_labels, load_isbi(isbi_dir).train_labels)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".isbi2012-")]  # temporary folder gone


def test_fetch_keeps_old_copy_when_archive_is_corrupt(isbi_dir, http_root, tmp_path):
    root, url = http_root
    target = tmp_path / "isbi2012"
    target.mkdir()
    (target / "train-volume.tif").write_bytes(b"old")
    with zipfile.ZipFile(root / "bad.zip", "w") as archive:
        for name in FILES:
            archive.writestr(name, _flipped(isbi_dir / name))
    with pytest.raises(DataError):
        fetch(target, url=f"{url}/bad.zip")
    assert [p.name for p in target.iterdir()] == ["train-volume.tif"]
    assert (target / "train-volume.tif").read_bytes() == b"old"


def test_fetch_reports_unreachable_url_and_leaves_no_folder(tmp_path):
    with pytest.raises(DataError, match="could not download"):
        fetch(tmp_path / "data" / "isbi2012", url="http://127.0.0.1:9/none.zip")
    assert list(tmp_path.iterdir()) == []


def test_fetch_installs_into_the_environment_folder(isbi_dir, http_root, tmp_path, monkeypatch):
    root, url = http_root
    _zip(root / "isbi.zip", isbi_dir)
    monkeypatch.setenv("ISBI2012_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert data.main(["fetch", "--url", f"{url}/isbi.zip"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == sorted(FILES)
    assert not (tmp_path / "data").exists()


def test_command_line_verify(isbi_dir, tmp_path, capsys):
    assert data.main(["verify", "--data-dir", str(isbi_dir)]) == 0
    assert "verified" in capsys.readouterr().out
    assert data.main(["verify", "--data-dir", str(tmp_path)]) == 2
    assert "fetch" in capsys.readouterr().err
    assert data.main(["verify", "--dir", str(isbi_dir)]) == 0  # the old spelling, with a note
    assert "--dir is now called --data-dir" in capsys.readouterr().err
