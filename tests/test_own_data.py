"""The README's path on a user's own folder of images, from the command line alone:
labels -> weight maps -> train (with validation) -> predict -> evaluate -> masks and cell ids out."""
import json

import numpy as np
import tifffile
from PIL import Image
from skimage import io as skio
from skimage.measure import label

from ronneberger2015 import load_model, predict
from ronneberger2015.__main__ import main


def _cells(seed: int, shape=(140, 150)) -> tuple[np.ndarray, np.ndarray]:
    """A grey frame with bright discs, some touching, and their uint16 ids."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.uint16)
    rows, cols = np.indices(shape)
    for cell in range(1, 7):
        r, c, radius = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20), rng.integers(8, 16)
        ids[(rows - r) ** 2 + (cols - c) ** 2 < radius**2] = cell
    image = np.clip(60 + 120 * (ids > 0) + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    return image, ids


def test_a_folder_of_images_end_to_end(tmp_path, capsys):
    for folder in ("images", "labels", "val-images", "val-labels"):
        (tmp_path / folder).mkdir()
    for seed in range(3):
        image, ids = _cells(seed)
        skio.imsave(tmp_path / "images" / f"frame{seed}.png", image, check_contrast=False)
        tifffile.imwrite(tmp_path / "labels" / f"frame{seed}.tif", ids, compression="lzw")  # as tracking data come
    image, ids = _cells(9)
    Image.fromarray(image).save(tmp_path / "val-images" / "v.gif")
    tifffile.imwrite(tmp_path / "val-labels" / "v.tif", ids)

    assert main(["weightmap", str(tmp_path / "labels"), "-o", str(tmp_path / "weights")]) == 0
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["frame0.tif", "frame1.tif", "frame2.tif"]
    assert "labels read as instance ids" in capsys.readouterr().out

    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "images"), str(tmp_path / "labels"), "-o", str(run), "--preset", "smoke",
                 "--base-channels", "4", "--depth", "3", "--input-tile", "124", "--iterations", "50",
                 "--validate-every", "25", "--select-by", "iou", "--device", "cpu", "--threads", "1",
                 "--val", str(tmp_path / "val-images"), str(tmp_path / "val-labels")]) == 0
    out = capsys.readouterr().out
    assert "trained 50 iterations in" in out and "final loss" in out and "best iou" in out
    config = json.loads((run / "config.json").read_text())
    assert config["inputs"]["images"] == str(tmp_path / "images") and config["version"] and "train" in config["command"]
    assert config["config"]["network"]["base_channels"] == 4 and len(config["cells"]) == 3 and all(config["cells"])

    assert main(["predict", str(tmp_path / "val-images"), "-o", str(tmp_path / "p"), "--checkpoint",
                 str(run / "best.pt")]) == 0
    probabilities = tifffile.imread(tmp_path / "p" / "v.tif")
    np.testing.assert_allclose(probabilities, predict(load_model(run / "best.pt"), image)[1], atol=1e-6)
    assert "wrote cell-interior probabilities of 1 image(s) of 140x150" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path / "val-labels"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"vrand", "iou", "dice", "iou_by_threshold"} <= set(scores)

    assert main(["predict", str(tmp_path / "val-images"), "-o", str(tmp_path / "cells"), "--checkpoint",
                 str(run / "best.pt"), "--instances", "--threshold", "0.4"]) == 0
    cells = skio.imread(tmp_path / "cells" / "v.png")  # a GIF input comes back as PNG, one id per cell
    np.testing.assert_array_equal(cells, label(probabilities > 0.4, connectivity=1))
