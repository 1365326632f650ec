"""Image reading/writing, atomic writes, and the [0, 1] image convention."""
import os

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from ronneberger2015.io import atomic_path, image_to_float, read_image, write_tiff


def test_tiff_stack_round_trip(tmp_path):
    stack = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    write_tiff(tmp_path / "out.tif", stack)
    np.testing.assert_array_equal(read_image(tmp_path / "out.tif"), stack)
    assert len(tifffile.TiffFile(tmp_path / "out.tif").pages) == 3


def test_png(tmp_path):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    skio.imsave(tmp_path / "a.png", image, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)
    skio.imsave(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match="colour PNG"):
        read_image(tmp_path / "rgb.png")


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="junk.tif: cannot be read"):
        read_image(tmp_path / "junk.tif")
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_image(tmp_path / "a.jpg")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "good"
    assert list(tmp_path.iterdir()) == [target]


def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_tiff(tmp_path / "out.tif", np.zeros((2, 2), np.float32))
    finally:
        os.umask(previous)
    assert (tmp_path / "out.tif").stat().st_mode & 0o777 == 0o644


def test_image_to_float():
    assert image_to_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert image_to_float(np.array([0, 65535], np.uint16)).dtype == np.float32
    with pytest.raises(ValueError, match="NaN"):
        image_to_float(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match=r"not \[0, 1\]"):
        image_to_float(np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match="dtype"):
        image_to_float(np.array([1, 2], np.int32))
