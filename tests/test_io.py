"""Image reading/writing, atomic writes, and the [0, 1] image convention."""
import os

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from ronneberger2015.io import atomic_path, image_to_float, read_image, read_images, write_tiff


def test_tiff_stack_round_trip(tmp_path):
    stack = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    write_tiff(tmp_path / "out.tif", stack)
    np.testing.assert_array_equal(read_image(tmp_path / "out.tif"), stack)
    assert len(tifffile.TiffFile(tmp_path / "out.tif").pages) == 3


def test_png(tmp_path):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    skio.imsave(tmp_path / "a.png", image, check_contrast=False)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)


def test_colour_images_are_refused_in_every_format(tmp_path):
    """RGB data would otherwise be read as a stack of 512 x 3 slices (TIFF) or garbage."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    skio.imsave(tmp_path / "rgb.png", rgb, check_contrast=False)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "rgb-stack.tif", np.stack([rgb, rgb]), photometric="rgb")
    Image.fromarray(rgb).save(tmp_path / "rgb.gif")
    for name in ("rgb.png", "rgb.tif", "rgb-stack.tif", "rgb.gif"):
        with pytest.raises(ValueError, match=f"{name}: a colour image .*one grey channel"):
            read_image(tmp_path / name)
    grey_stack = rgb.transpose(2, 0, 1).copy()  # three grey slices of 8 x 10 stay a stack
    tifffile.imwrite(tmp_path / "grey-stack.tif", grey_stack, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "grey-stack.tif"), grey_stack)


def test_gif_masks(tmp_path):
    from PIL import Image

    mask = np.zeros((6, 9), np.uint8)
    mask[1:4, 2:7] = 255
    Image.fromarray(mask).convert("P").save(tmp_path / "mask.gif")  # a palette GIF, as masks are often stored
    np.testing.assert_array_equal(read_image(tmp_path / "mask.gif"), mask)


def test_folders_are_stacks_in_name_order(tmp_path):
    images = np.random.default_rng(1).integers(0, 255, (3, 6, 7), dtype=np.uint8)
    for name, image in zip(("b.png", "a.tif", "c.png"), images):
        (skio.imsave(tmp_path / name, image, check_contrast=False) if name.endswith(".png")
         else tifffile.imwrite(tmp_path / name, image))
    (tmp_path / "notes.txt").write_text("ignored")
    stack, files = read_images(tmp_path)
    assert [f.name for f in files] == ["a.tif", "b.png", "c.png"]
    np.testing.assert_array_equal(stack, images[[1, 0, 2]])
    tifffile.imwrite(tmp_path / "d.tif", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"differ in size \(5x5, 6x7\)"):
        read_images(tmp_path)
    single, files = read_images(tmp_path / "a.tif")
    assert single.shape == (1, 6, 7) and files == [tmp_path / "a.tif"]


def test_a_missing_codec_names_the_package(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "lzw.tif", np.zeros((4, 4), np.uint8))

    def without_codec(*args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", without_codec)
    with pytest.raises(ValueError, match="needs the imagecodecs package.*pip install imagecodecs") as raised:
        read_image(tmp_path / "lzw.tif")
    assert "complete" not in str(raised.value)


def test_lzw_tiffs_are_read(tmp_path):
    """The cell tracking challenge's frames are LZW-compressed; imagecodecs is a dependency."""
    image = np.arange(48, dtype=np.uint16).reshape(6, 8)
    tifffile.imwrite(tmp_path / "lzw.tif", image, compression="lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "lzw.tif"), image)


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
