"""The weight map of Eq. 2 against its definition, on synthetic cells and ISBI 2012 slices."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import io as skio

from ronneberger2015.__main__ import main
from ronneberger2015.weightmap import (
    RESOLUTION,
    _border_term,
    _reach,
    separate_instances,
    target_and_weights,
    weight_map,
)

TOLERANCE = 1e-4


def brute_force_term(cells: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Eq. 2's border term by its definition: one full-image distance transform per cell, the two smallest per pixel."""
    distances = [ndimage.distance_transform_edt(cells != i) for i in np.unique(cells[cells != 0])]
    d1, d2 = np.partition(distances, 1, axis=0)[:2]
    return (cells == 0) * w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def brute_force(cells: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """w(x) of Eq. 2 with w_c = N / (2 N_class); ``cells``: 0 = background, 1..n (n >= 2) = cells."""
    background = cells == 0
    w_c = np.where(background, cells.size / (2 * background.sum()), cells.size / (2 * (~background).sum()))
    return (w_c + brute_force_term(cells, w0, sigma)).astype(np.float32)


def two_discs(gap: int, radius: int = 8, size: tuple[int, int] = (48, 120)) -> tuple[np.ndarray, tuple[int, int]]:
    """A {0, 255} mask with two discs on one row whose facing pixels are ``gap`` apart, and the gap's centre."""
    rows, cols = np.indices(size)
    row, left = size[0] // 2, 10 + radius
    right = left + 2 * radius + gap
    mask = (rows - row) ** 2 + np.minimum((cols - left) ** 2, (cols - right) ** 2) <= radius**2
    return mask.astype(np.uint8) * 255, (row, left + radius + gap // 2)


def random_cells(seed: int, shape: tuple[int, int] = (96, 128), count: int = 14) -> np.ndarray:
    """A binary mask of random discs and rectangles, some merged, some cut by the image edge."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        if rng.random() < 0.5:
            mask |= (rows - r) ** 2 + (cols - c) ** 2 <= rng.integers(1, 9) ** 2
        else:
            mask[r : r + rng.integers(1, 12), c : c + rng.integers(1, 12)] = True
    return mask


def cells_of(mask: np.ndarray) -> np.ndarray:
    return ndimage.label(mask)[0]


# Eq. 2 against the definition


@pytest.mark.parametrize("gap", [2, 4, 10, 20, 30])
def test_gap_centre_weight(gap):
    mask, centre = two_discs(gap)
    w = weight_map(mask)
    background = mask == 0
    w_c = mask.size / (2 * background.sum())
    assert w[centre] == pytest.approx(10.0 * math.exp(-(gap**2) / (2 * 5.0**2)) + w_c, abs=TOLERANCE)
    np.testing.assert_allclose(w, brute_force(cells_of(mask)), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (50.0, 6.0), (10.0, 1.5), (3.0, 12.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cells_match_definition(seed, w0, sigma):
    mask = random_cells(seed)
    np.testing.assert_allclose(
        weight_map(mask, w0=w0, sigma=sigma), brute_force(cells_of(mask), w0, sigma), rtol=0, atol=TOLERANCE
    )


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (50.0, 6.0)])
def test_border_term_is_exact_to_float32_resolution(w0, sigma):
    # gaps around T (28.4 px for the defaults), where the fast map stops looking at a cell
    for gap in range(20, 45):
        cells = cells_of(two_discs(gap, radius=3)[0])
        within, values = _border_term(cells, w0, sigma)
        fast = np.zeros(cells.shape)
        fast[within] = values
        np.testing.assert_allclose(fast, brute_force_term(cells, w0, sigma), rtol=1e-12, atol=RESOLUTION)


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (50.0, 6.0), (1.0, 0.5), (1e3, 20.0)])
def test_reach_is_where_the_term_falls_below_float32_resolution(w0, sigma):
    reach = _reach(w0, sigma)
    beyond = w0 * math.exp(-((reach + 2) ** 2) / (2 * sigma**2))  # d1 >= 1, d2 >= reach + 1
    assert beyond <= RESOLUTION < w0 * math.exp(-((reach + 1) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("z, rows, cols", [(0, slice(None), slice(None)), (17, slice(256, 512), slice(100, 356))])
def test_isbi_slices_match_definition(isbi, z, rows, cols):
    labels = isbi.train_labels[z, rows, cols]
    np.testing.assert_allclose(weight_map(labels), brute_force(cells_of(labels == 255)), rtol=0, atol=TOLERANCE)


def test_isbi_border_weights_are_on_membranes(isbi):
    labels = isbi.train_labels[3]
    target, w = target_and_weights(labels)
    np.testing.assert_array_equal(target, labels == 255)
    assert np.isfinite(w).all() and w.dtype == np.float32 and w.shape == labels.shape
    membrane = labels == 0
    assert w[membrane].mean() > 3 * w[~membrane].mean()
    np.testing.assert_allclose(np.unique(w[~membrane]), [labels.size / (2 * (~membrane).sum())], rtol=1e-6)


# reading the labels: cells, separation, class balance


def test_binary_readings_agree():
    mask = random_cells(3)
    expected = weight_map(mask)
    for labels in (mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(float), mask.astype(np.int32) * 7):
        np.testing.assert_array_equal(weight_map(labels), expected)


def test_separate_instances_cuts_the_larger_id():
    instances = np.zeros((6, 8), dtype=np.uint16)
    instances[1:5, 1:4] = 5
    instances[1:5, 4:7] = 2
    separated = separate_instances(instances)
    expected = instances.copy()
    expected[1:5, 3] = 0  # id 5 is larger: its pixels along the contact become background
    np.testing.assert_array_equal(separated, expected)
    assert separated.dtype == instances.dtype


def test_separation_leaves_no_touching_ids_and_commutes_with_flips():
    rng = np.random.default_rng(4)
    instances = ndimage.zoom(rng.integers(0, 9, size=(12, 12)), 5, order=0)  # touching blocks of ids 0..8
    separated = separate_instances(instances)
    for a, b in ((separated[:-1], separated[1:]), (separated[:, :-1], separated[:, 1:])):
        assert not ((a != b) & (a != 0) & (b != 0)).any()
    assert ((separated == instances) | (separated == 0)).all()
    for k in range(4):
        np.testing.assert_array_equal(separate_instances(np.rot90(instances, k)), np.rot90(separated, k))
    np.testing.assert_array_equal(separate_instances(instances[::-1]), separated[::-1])


def test_touching_instances_are_separated_first():
    instances = np.zeros((40, 60), dtype=np.int32)
    instances[10:30, 5:30] = 1
    instances[10:30, 30:55] = 2
    instances[0:4, 0:4] = 3
    target, w = target_and_weights(instances)
    separated = separate_instances(instances)
    np.testing.assert_array_equal(target, separated != 0)
    assert (target[10:30, 30] == 0).all()
    np.testing.assert_allclose(w, brute_force(separated), rtol=0, atol=TOLERANCE)
    # on the cut line d1 = d2 = 1
    w_c = target.size / (2 * (target == 0).sum())
    assert w[20, 30] == pytest.approx(10 * math.exp(-4 / 50) + w_c, abs=TOLERANCE)


def test_instances_argument_forces_the_reading():
    instances = np.zeros((30, 50), dtype=np.int32)
    instances[5:25, 5:25] = 1
    instances[5:25, 25:45] = 2
    merged = weight_map(instances, instances=False)  # one cell: no border term, only w_c
    assert len(np.unique(merged)) == 2
    assert weight_map(instances)[15, 25] > 9  # read as instances: cut and weighted
    single = np.zeros((30, 50), dtype=np.uint8)
    single[5:10, 5:10] = single[5:10, 20:25] = 255
    np.testing.assert_array_equal(weight_map(single, instances=True), weight_map(single, w0=0))


def test_class_balance():
    mask = random_cells(5)
    w_c = weight_map(mask, w0=0)
    assert w_c.mean() == pytest.approx(1.0, abs=1e-6)
    assert len(np.unique(w_c)) == 2
    unbalanced = weight_map(mask, class_balance=False)
    np.testing.assert_array_equal(unbalanced[mask], 1.0)
    np.testing.assert_allclose(unbalanced - 1, weight_map(mask) - w_c, atol=1e-5)


@pytest.mark.parametrize("fill", [0, 255])
def test_no_cells_or_no_background_gives_ones(fill):
    labels = np.full((20, 30), fill, dtype=np.uint8)
    target, w = target_and_weights(labels)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(target, fill > 0)


def test_one_cell_gives_only_w_c():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 5:10] = True
    w = weight_map(mask)
    np.testing.assert_allclose(w[mask], mask.size / (2 * mask.sum()))
    np.testing.assert_allclose(w[~mask], mask.size / (2 * (~mask).sum()))


def test_stack_is_mapped_slice_by_slice():
    stack = np.stack([random_cells(seed) for seed in (6, 7, 8)]).astype(np.uint8)
    stack[1] = 0
    np.testing.assert_array_equal(weight_map(stack), np.stack([weight_map(s) for s in stack]))


@pytest.mark.parametrize(
    "labels, kwargs, message",
    [
        (np.zeros(10), {}, r"shape \(10,\)"),
        (np.zeros((2, 3, 4, 5)), {}, r"shape \(2, 3, 4, 5\)"),
        (np.zeros((0, 5)), {}, "empty"),
        (np.full((4, 4), 0.5), {}, "whole numbers"),
        (np.full((4, 4), np.nan), {}, "whole numbers"),
        (np.full((4, 4), -1), {}, ">= 0"),
        (np.zeros((4, 4), dtype=complex), {}, "dtype"),
        (np.zeros((4, 4)), {"sigma": -1.0}, "sigma"),
        (np.zeros((4, 4)), {"sigma": 0.0}, "sigma"),
        (np.zeros((4, 4)), {"sigma": float("nan")}, "sigma"),
        (np.zeros((4, 4)), {"w0": -1.0}, "w0"),
    ],
)
def test_bad_input_raises_a_clear_error(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        weight_map(labels, **kwargs)


# the command line


def test_cli_png_image(tmp_path, capsys):
    mask = random_cells(9).astype(np.uint8) * 255
    skio.imsave(tmp_path / "labels.png", mask, check_contrast=False)
    out = tmp_path / "w.tif"
    assert main(["weightmap", str(tmp_path / "labels.png"), "-o", str(out), "--w0", "50", "--sigma", "6"]) == 0
    written = tifffile.imread(out)
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written, weight_map(mask, w0=50, sigma=6))
    assert "wrote" in capsys.readouterr().out


def test_cli_stack_with_preview(tmp_path, capsys):
    labels = np.stack([random_cells(seed) for seed in (10, 11)]).astype(np.uint8) * 255
    image = np.random.default_rng(0).integers(0, 255, size=labels.shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    tifffile.imwrite(tmp_path / "image.tif", image)
    out, preview = tmp_path / "out" / "w.tif", tmp_path / "preview.png"
    argv = ["weightmap", str(tmp_path / "labels.tif"), "-o", str(out), "--no-class-balance",
            "--preview", str(preview), "--image", str(tmp_path / "image.tif"), "--preview-slice", "1"]
    assert main(argv) == 0
    np.testing.assert_array_equal(tifffile.imread(out), weight_map(labels, class_balance=False))
    assert skio.imread(preview).shape[1] > skio.imread(preview).shape[0] * 2  # three panels side by side
    assert "slice" in capsys.readouterr().err  # the progress bar


def writes(array: np.ndarray):
    return lambda path: tifffile.imwrite(path, array)


EMPTY = writes(np.zeros((8, 8), np.uint8))
PREVIEW = ["--preview", "{folder}/p.png"]


@pytest.mark.parametrize(
    "write, extra, message",
    [
        (None, [], "no such file"),
        (lambda path: path.write_bytes(b"not a tiff"), [], "cannot be read"),
        (writes(np.zeros((2, 2, 4, 4), np.uint8)), [], "shape"),
        (writes(np.full((8, 8), 0.5, np.float32)), [], "whole numbers"),
        (EMPTY, ["--sigma", "-2"], "sigma"),
        (EMPTY, ["--image", "{folder}/labels.tif", *PREVIEW], None),
        (EMPTY, ["--image", "{folder}/none.png", *PREVIEW], "no such"),
        (EMPTY, ["--preview-slice", "3", *PREVIEW], "slice"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, write, extra, message):
    labels = tmp_path / "labels.tif"
    if write is not None:
        write(labels)
    extra = [arg.format(folder=tmp_path) for arg in extra]
    code = main(["weightmap", str(labels), "-o", str(tmp_path / "w.tif"), *extra])
    err = capsys.readouterr().err
    if message is None:  # the control: the same call with good input succeeds
        assert code == 0
        return
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "w.tif").exists()


def test_cli_refuses_a_non_tiff_output_and_a_mismatched_image(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((8, 9), np.uint8))
    assert main(["weightmap", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "w.png")]) == 2
    assert ".tif" in capsys.readouterr().err
    assert main(["weightmap", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "w.tif"),
                 "--image", str(tmp_path / "image.tif"), "--preview", str(tmp_path / "p.png")]) == 2
    assert "differs" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", np.zeros((8, 8), np.uint8))
    for argv in ([str(tmp_path / "labels.tif")], [str(tmp_path / "labels.tif"), "-o", "w.tif", "--image", "i.tif"]):
        with pytest.raises(SystemExit) as exit_:
            main(["weightmap", *argv])
        assert exit_.value.code == 2


def test_cli_never_writes_over_its_input(tmp_path, capsys):
    labels = random_cells(12).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "link.tif").symlink_to(tmp_path / "labels.tif")
    for output in ("labels.tif", "./labels.tif", "link.tif"):
        assert main(["weightmap", str(tmp_path / "labels.tif"), "-o", str(tmp_path / output)]) == 2
        assert "is an input: writing it would destroy" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), labels)


def test_cli_says_how_labels_were_read_and_warns_on_empty_slices(tmp_path, capsys):
    classes = np.zeros((2, 20, 20), np.uint8)
    classes[0, 2:8, 2:8], classes[0, 10:18, 10:18] = 1, 2  # a 0/1/2 class mask reads as two cell ids
    tifffile.imwrite(tmp_path / "classes.tif", classes)
    assert main(["weightmap", str(tmp_path / "classes.tif"), "-o", str(tmp_path / "w.tif")]) == 0
    captured = capsys.readouterr()
    assert "labels read as instance ids" in captured.out and "--binary" in captured.out
    assert "2 cells in 2 slices" in captured.out
    assert "slice(s) [1] have no cell" in captured.err
    assert main(["weightmap", str(tmp_path / "classes.tif"), "-o", str(tmp_path / "w.tif"), "--binary"]) == 0
    assert "a binary mask" in capsys.readouterr().out


def test_non_finite_weights_are_refused(tmp_path, capsys):
    labels = random_cells(13).astype(np.uint8) * 255
    with pytest.raises(ValueError, match="overflows float32 with w0 = 1e\\+300"):
        weight_map(labels, w0=1e300)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    assert main(["weightmap", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "w.tif"), "--w0", "1e300"]) == 2
    assert not (tmp_path / "w.tif").exists()


def test_cli_checks_the_preview_name_before_writing(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "labels.tif", random_cells(14).astype(np.uint8) * 255)
    assert main(["weightmap", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "w.tif"),
                 "--preview", str(tmp_path / "p.jpg")]) == 2
    assert "the preview is a PNG" in capsys.readouterr().err and not (tmp_path / "w.tif").exists()


def test_cli_folder_in_folder_out(tmp_path):
    from PIL import Image

    (tmp_path / "masks").mkdir()
    masks = [random_cells(seed).astype(np.uint8) * 255 for seed in (15, 16)]
    skio.imsave(tmp_path / "masks" / "a.png", masks[0], check_contrast=False)
    Image.fromarray(masks[1]).convert("P").save(tmp_path / "masks" / "b.gif")
    assert main(["weightmap", str(tmp_path / "masks"), "-o", str(tmp_path / "weights")]) == 0
    for name, mask in zip(("a.tif", "b.tif"), masks):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "weights" / name), weight_map(mask))
