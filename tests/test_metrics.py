"""ISBI 2012 metrics: hand-computed toy cases, digital topology, thresholds, and skimage cross-checks."""
import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information

from ronneberger2015.__main__ import main
from ronneberger2015.metrics import (
    NEIGHBOURS,
    SIMPLE,
    SWEEP,
    WARPING_SWEEP,
    dice,
    evaluate,
    iou,
    pixel_error,
    rand_error,
    thin,
    topology_errors,
    vinfo,
    vrand,
    warp,
    warping_error,
)

# Two 5x4 cells (A left, B right) in a 7x11 image, a one-pixel membrane between
# them and a frame of membrane: 77 pixels, n = 40 of cell interior.
TRUTH = np.zeros((7, 11), np.uint8)
TRUTH[1:6, 1:5] = 255
TRUTH[1:6, 6:10] = 255
PIXELS, N = TRUTH.size, 40


def _proposal(*edits):
    """The truth as a 0/1 probability map with ``(rows, cols, value)`` painted on."""
    proposal = TRUTH / 255.0
    for rows, cols, value in edits:
        proposal[rows, cols] = value
    return proposal


def _split_info_score():
    """V_info of the split toy: B has segments 8, 8, 20 and 4 singletons; I = H(A) = ln 2."""
    h_b = -(2 * 0.2 * np.log(0.2) + 0.5 * np.log(0.5) + 4 / N * np.log(1 / N))
    return 2 * np.log(2) / (np.log(2) + h_b)


# Each toy's five values, worked out by hand (see the comments); a binary
# proposal gives the same binarisation at every threshold.
TOYS = {
    # identical: no error, perfect scores
    "perfect": (_proposal(), dict(warping_error=0, rand_error=0, pixel_error=0, vrand=1, vinfo=1)),
    # membrane between A and B missing: 5 FP pixels, F = 80/85; one segment over both
    # cells: TP = 20^2 + 20^2 = 800, FP = 40^2 - 800, FN = 0, F = 2/3; every membrane
    # pixel would join A and B: 5 mergers; H(B) = 0 so V_info = 0 (challenge rule)
    "merged pair": (
        _proposal((slice(1, 6), 5, 1.0)),
        dict(warping_error=5 / PIXELS, rand_error=1 / 3, pixel_error=5 / 85, vrand=2 / 3, vinfo=0),
    ),
    # one-pixel gap in that membrane: 1 FP, F = 80/81; the same single segment; 1 merger
    "one-pixel gap": (
        _proposal((3, 5, 1.0)),
        dict(warping_error=1 / PIXELS, rand_error=1 / 3, pixel_error=1 / 81, vrand=2 / 3, vinfo=0),
    ),
    # A cut by a membrane row: 4 FN, F = 72/76; segments 8, 8, 20 + 4 singletons:
    # TP = 64 + 64 + 400 + 4 = 532, FP = 0, FN = 800 - 532, F = 1064/1332; the cut
    # shrinks to 1 split pixel; thinning keeps the cut row as a dam (singletons)
    "one split": (
        _proposal((3, slice(1, 5), 0.0)),
        dict(warping_error=1 / PIXELS, rand_error=268 / 1332, pixel_error=4 / 76, vrand=1064 / 1332, vinfo=_split_info_score()),
    ),
    # nothing found: F = 0; all 40 pixels singletons: TP = 40, FP = 0, FN = 800 - 40,
    # F = 80/840; cells shrink to one pixel each, object deletions that do not count;
    # V_info: I = H(A) = ln 2, H(B) = ln 40
    "all background": (
        np.zeros(TRUTH.shape),
        dict(warping_error=0, rand_error=1 - 80 / 840, pixel_error=1, vrand=80 / 840, vinfo=2 * np.log(2) / np.log(80)),
    ),
}


@pytest.mark.parametrize("toy", TOYS)
def test_hand_computed_toys(toy):
    proposal, expected = TOYS[toy]
    got = evaluate(proposal, TRUTH)
    assert list(got) == ["warping_error", "rand_error", "pixel_error", "vrand", "vinfo"]
    assert got == pytest.approx(expected, abs=1e-12)
    for name, function in (("warping_error", warping_error), ("rand_error", rand_error), ("pixel_error", pixel_error), ("vrand", vrand), ("vinfo", vinfo)):
        assert function(proposal, TRUTH) == got[name]


def test_details_hold_every_threshold_and_slice():
    proposal = np.stack([TOYS["one split"][0], TOYS["merged pair"][0]])
    truth = np.stack([TRUTH, TRUTH])
    value, table = rand_error(proposal, truth, details=True)
    assert table.values.shape == (11,) and table.per_slice.shape == (11, 2)
    assert table.counts["tp"][:, 0].tolist() == [532] * 11 and table.counts["fn"][:, 1].tolist() == [0] * 11
    assert table.per_slice[0].tolist() == pytest.approx([268 / 1332, 1 / 3])
    assert value == table.value == pytest.approx(1 - 2 * (532 + 800) / (2 * (532 + 800) + 268 + 800))  # micro: counts summed
    assert table.best == 0 and table.threshold == 0.0  # ties keep the lowest threshold
    value, table = vrand(proposal, truth, details=True)
    assert value == pytest.approx((1064 / 1332 + 2 / 3) / 2)  # macro: per-slice scores averaged
    value, table = warping_error(proposal, truth, details=True)
    assert table.thresholds.shape == (10,)
    assert table.counts["splits"][:, 0].tolist() == [1] * 10 and table.counts["mergers"][:, 1].tolist() == [5] * 10
    assert value == pytest.approx(6 / (2 * PIXELS))


def test_threshold_sweeps_accumulate_in_doubles():
    assert len(SWEEP) == 11 and SWEEP[-1] == 0.9999999999999999 and SWEEP[3] == 0.30000000000000004
    assert len(WARPING_SWEEP) == 10 and WARPING_SWEEP[-1] == 0.8999999999999999
    truth = np.ones((4, 4), np.uint8)
    # float32 0.3 is 0.30000001... > 0.30000000000000004 and 1.0 > 0.9999999999999999 only in
    # double precision, as the challenge compares; numpy would compare float32 in float32
    for value, k in ((0.3, 3), (1.0, 10)):
        _, table = pixel_error(np.full((4, 4), value, np.float32), truth, details=True)
        assert table.counts["tp"][k, 0] == 16
    _, table = pixel_error(np.full((4, 4), 0.5), truth, details=True)  # strict: 0.5 > 0.5 is false
    assert table.counts["tp"][5, 0] == 0 and table.counts["tp"][4, 0] == 16
    # 0/1 truth stays cell interior at every threshold (truth > 0, not truth > th)
    assert pixel_error(np.ones((4, 4)), truth.astype(np.float32)) == 0


def _window(code, centre):
    window = np.zeros((3, 3), bool)
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        window[1 + dy, 1 + dx] = code >> k & 1
    window[1, 1] = centre
    return window


def _components(image):
    """Independent count: 4-connected objects and 8-connected background (skimage.measure.label)."""
    return label(image, connectivity=1).max(), label(~image, connectivity=2).max()


def test_simple_point_table_on_all_256_configurations():
    for code in range(256):
        for centre in (False, True):
            window = _window(code, centre)
            flipped = window.copy()
            flipped[1, 1] = not centre
            assert SIMPLE[code] == (_components(window) == _components(flipped)), (code, centre)
    assert not SIMPLE[0] and not SIMPLE[255]  # isolated pixel, one-pixel hole


def test_simple_points_preserve_the_whole_image_topology():
    rng = np.random.default_rng(0)
    for _ in range(50):
        image = np.pad(rng.random((8, 8)) < rng.uniform(0.3, 0.8), 1)
        before = _components(image)
        for y, x in np.ndindex(8, 8):
            window = image[y : y + 3, x : x + 3]
            code = sum(int(window[1 + dy, 1 + dx]) << k for k, (dy, dx) in enumerate(NEIGHBOURS))
            flipped = image.copy()
            flipped[y + 1, x + 1] ^= True
            assert SIMPLE[code] == (_components(flipped) == before)


def test_split_and_merger_classification_against_relabelling():
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(100):
        warped, target = rng.random((2, 10, 10)) < rng.uniform(0.3, 0.8, (2, 1, 1))
        splits, mergers = topology_errors(warped, target)
        before = _components(np.pad(warped, 1))[0]
        for y, x in zip(*np.nonzero(warped != target)):
            flipped = warped.copy()
            flipped[y, x] ^= True
            change = _components(np.pad(flipped, 1))[0] - before
            assert splits[y, x] == (warped[y, x] and change > 0)
            assert mergers[y, x] == (not warped[y, x] and change < 0)
            found += splits[y, x] + mergers[y, x]
    assert found > 1000


def _cell():
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    return truth


def test_moving_a_boundary_by_one_pixel_costs_nothing():
    truth = _cell()
    for target in (np.roll(truth, 1, axis=1), ndimage.binary_dilation(truth), ndimage.binary_erosion(truth)):
        assert np.array_equal(warp(truth, target, np.ones(truth.shape)), target)
        assert warping_error(target.astype(float), truth) == 0
    blurred = ndimage.gaussian_filter(np.roll(truth, 1, axis=0).astype(float), 1.5)
    assert warping_error(blurred, truth) == 0


@pytest.mark.parametrize("width", [1, 2, 3])
def test_cutting_a_cell_costs_exactly_the_split_pixels(width):
    truth = _cell()
    proposal = truth.astype(float)
    proposal[9 : 9 + width, 5:15] = 0.0
    value, table = warping_error(proposal, truth, details=True)
    assert value * truth.size == width  # the cut shrinks to one pixel per cut row
    assert table.counts["splits"][0, 0] == width and table.counts["mergers"][0, 0] == 0


def test_warping_visits_by_priority_pass_after_pass():
    truth = _cell()
    target = truth.copy()
    target[9, 5:15] = False  # cut row: columns 5..14
    priority = np.ones(truth.shape)
    priority[9, 11] = 0.5
    # pass 1, in raster order among equals: 5..10 flip (each next to the last flipped), 12 and 13
    # would open a hole, 14 flips, then 11 (least confident, visited last) flips; pass 2: 12 flips;
    # 13 would cut the cell and stays. (Always flipping the most confident simple pixel first
    # would instead leave 11.)
    splits, mergers = topology_errors(warp(truth, target, priority), target)
    assert np.argwhere(splits).tolist() == [[9, 13]] and not mergers.any()


def test_a_missing_wide_membrane_costs_one_pixel_per_row():
    truth = np.zeros((12, 14), bool)
    truth[1:11, 1:6] = truth[1:11, 8:13] = True  # membrane two pixels wide, 10 rows
    proposal = truth.astype(float)
    proposal[1:11, 6:8] = 1.0
    _, table = warping_error(proposal, truth, details=True)
    assert table.counts["mergers"][0, 0] == 10 and table.counts["splits"][0, 0] == 0


def test_outside_the_image_is_background():
    truth = np.ones((6, 8), bool)  # one cell filling the image
    proposal = np.ones((6, 8))
    proposal[3] = 0.0  # cut from border to border: flips inwards from the outside, one split left
    _, table = warping_error(proposal, truth, details=True)
    assert table.counts["splits"][0, 0] == 1 and table.counts["other"][0, 0] == 0


def test_thinning_leaves_one_pixel_dams():
    mask = np.zeros((5, 9), bool)
    mask[:, :3] = mask[:, 6:] = True  # a border three pixels wide
    segments = thin(mask)
    assert segments[:, :4].tolist() == [[1, 1, 1, 1]] * 5 and (segments[:, 4] == 0).all() and (segments[:, 5:] == 2).all()
    assert (thin(np.zeros((4, 4), bool)) == 0).all()


def _singletons(segments):
    """Each label-0 pixel its own label: the challenge's singleton convention for skimage."""
    segments = segments.copy()
    background = segments == 0
    segments[background] = segments.max() + 1 + np.arange(background.sum())
    return segments


def test_rand_and_information_terms_agree_with_skimage(isbi):
    """Cross-check on ISBI ground truth against an eroded copy with random cuts.

    The conventions map as follows. Truth background: ``ignore_labels=(0,)`` in
    skimage drops the same pixels. Proposal background: the challenge makes each
    pixel a singleton, so it is relabelled uniquely before skimage (skimage
    would otherwise treat label 0 as one segment). Pairs: the challenge counts
    ordered pairs with self-pairs (TP = sum N_ij^2), skimage without them
    (sum N_ij^2 - n), so the F-scores differ by design and the pair counts
    agree after subtracting n. skimage's ``precision`` divides by the truth's
    pairs, which is the challenge's recall. Entropies: skimage in bits, ours in nats.
    """
    rng = np.random.default_rng(0)
    truth = isbi.train_labels[:2]
    proposal = np.stack([ndimage.binary_erosion(s > 0) for s in truth])
    for z, y, x in zip(rng.integers(0, 2, 40), rng.integers(0, 500, 40), rng.integers(0, 500, 40)):
        proposal[z, y, x : x + 12] = False
    tables = {name: table for name, (_, table) in evaluate(proposal.astype(np.float32), truth, details=True).items()}
    rand, thinned_rand, info = tables["rand_error"], tables["vrand"], tables["vinfo"]
    for z in range(2):
        objects = label(truth[z] > 0, connectivity=1)
        n = np.count_nonzero(objects)
        for counts, segments in ((rand.counts, label(proposal[z], connectivity=1)), (thinned_rand.counts, thin(proposal[z]))):
            tp, fp, fn = (counts[key][0, z] for key in ("tp", "fp", "fn"))
            error, precision, recall = adapted_rand_error(objects, _singletons(segments), ignore_labels=(0,))
            assert precision == pytest.approx((tp - n) / (tp + fn - n), rel=1e-12)
            assert recall == pytest.approx((tp - n) / (tp + fp - n), rel=1e-12)
            assert 1 - error != pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-9)  # self-pairs: differ by design
        h_a, h_b, mutual = (info.counts[key][0, z] for key in ("h_truth", "h_proposal", "mutual"))
        test_given_truth, truth_given_test = variation_of_information(objects, _singletons(thin(proposal[z])), ignore_labels=(0,))
        assert test_given_truth * np.log(2) == pytest.approx(h_b - mutual, rel=1e-9)
        assert truth_given_test * np.log(2) == pytest.approx(h_a - mutual, rel=1e-9)
    # the truth against itself on real data: no error, perfect scores
    assert evaluate(truth[:1] / 255.0, truth[:1]) == pytest.approx(dict(warping_error=0, rand_error=0, pixel_error=0, vrand=1, vinfo=1))


@pytest.mark.parametrize(
    "proposal, truth, message",
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), "shape"),
        (np.full((4, 4), 255, np.uint8), np.ones((4, 4)), "exceed 1.*not logits or an 8-bit image"),
        (np.full((4, 4), -0.5), np.ones((4, 4)), "negative.*soft-max"),
        (np.full((4, 4), np.nan), np.ones((4, 4)), "NaN"),
        (np.zeros((4, 4)), np.arange(16).reshape(4, 4), "binary.*labels > 0"),
        (np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4)), "2D image or a"),
        (np.zeros((2, 4, 4)), np.stack([np.ones((4, 4)), np.zeros((4, 4))]), "slice 1 has no cell interior"),
    ],
)
def test_bad_inputs_are_named(proposal, truth, message):
    with pytest.raises(ValueError, match=message):
        evaluate(proposal, truth)


def test_command_line(tmp_path, capsys):
    membrane = np.stack([1.0 - TOYS["one split"][0], 1.0 - TOYS["merged pair"][0]]).astype(np.float32)
    tifffile.imwrite(tmp_path / "membrane.tif", membrane)
    tifffile.imwrite(tmp_path / "truth.tif", np.stack([TRUTH, TRUTH]))
    arguments = ["evaluate", str(tmp_path / "membrane.tif"), str(tmp_path / "truth.tif"), "--membrane"]
    assert main(arguments + ["--slices", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["warping_error"] == {"value": pytest.approx(5 / PIXELS), "threshold": 0.0}
    assert result["vrand"]["value"] == pytest.approx(2 / 3)
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert "warping error" in table and "V_info (thinned)" in table and "lower" in table and "higher" in table
    assert main(arguments[:-1]) == 0
    assert "pass --membrane" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "bytes.tif", (membrane * 255).astype(np.uint8))
    assert main(["evaluate", str(tmp_path / "bytes.tif"), str(tmp_path / "truth.tif")]) == 2
    assert "exceed 1" in capsys.readouterr().err
    assert main(arguments + ["--slices", "2-5"]) == 2
    assert "slices 0-1" in capsys.readouterr().err


def test_foreground_iou_and_dice_count_pixels():
    rng = np.random.default_rng(5)
    proposal, truth = rng.random((2, 9, 11)), rng.random((2, 9, 11)) > 0.5
    predicted = proposal > 0.3
    both, either = np.sum(predicted & truth), np.sum(predicted | truth)
    assert iou(proposal, truth, threshold=0.3) == pytest.approx(both / either)
    assert dice(proposal, truth, threshold=0.3) == pytest.approx(2 * both / (predicted.sum() + truth.sum()))
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\)"):
        iou(proposal, truth, threshold=1.0)


def test_command_line_scores_instance_truth_against_its_separated_mask(tmp_path, capsys):
    from ronneberger2015.weightmap import separate_instances

    cells = np.zeros((30, 40), np.uint16)
    cells[2:28, 2:20], cells[2:28, 20:38] = 7, 9  # two touching cells
    proposal = np.clip(np.random.default_rng(2).normal(0.5, 0.3, cells.shape), 0, 1) * (cells > 0)
    tifffile.imwrite(tmp_path / "p.tif", proposal.astype(np.float32))
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    assert main(["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "cells.tif"), "--json", "--threshold", "0.4"]) == 0
    captured = capsys.readouterr()
    result, separated = json.loads(captured.out), separate_instances(cells) > 0
    expected = evaluate(proposal.astype(np.float32), separated)
    assert {k: result[k]["value"] for k in expected} == pytest.approx(expected)
    assert result["iou"] == {"value": pytest.approx(iou(proposal.astype(np.float32), separated, threshold=0.4)),
                             "threshold": 0.4}
    assert "instance ids" in captured.err and "2 cells" in captured.err


def test_command_line_names_mismatched_stacks_and_both_polarity_causes(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "p.tif", np.full((3, 7, 11), 0.5, np.float32), photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", np.stack([TRUTH] * 2))
    assert main(["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "truth.tif"), "--slices", "0-1"]) == 2
    assert "the proposal (3 slice(s) of 7x11) and the truth (2 of 7x11) differ" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "inverted.tif", (255 - TRUTH)[None])
    tifffile.imwrite(tmp_path / "good.tif", (TRUTH / 255.0).astype(np.float32)[None])
    assert main(["evaluate", str(tmp_path / "good.tif"), str(tmp_path / "inverted.tif")]) == 0
    err = capsys.readouterr().err
    assert "pass --membrane" in err and "invert the labels" in err
