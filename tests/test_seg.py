"""The cell tracking challenge's SEG measure: hand-made cases, a brute-force loop over object pairs, py-ctcmetrics."""
import json

import numpy as np
import pytest
import tifffile
from ctc_metrics.metrics import seg as ctc_seg
from ctc_metrics.utils.representations import match as ctc_match
from scipy import ndimage

from ronneberger2015.__main__ import main
from ronneberger2015.metrics import matches, seg


def _brute_force(segmentation, truth):
    """SEG by its definition: every reference object against every segmented object, one pair at a time."""
    scores = []
    for proposed, reference in zip(segmentation, truth):  # (Z, H, W) stacks
        for r in np.unique(reference[reference > 0]):
            in_r = reference == r
            best = 0.0
            for s in np.unique(proposed[proposed > 0]):
                in_s = proposed == s
                if np.count_nonzero(in_r & in_s) > 0.5 * np.count_nonzero(in_r):
                    best = np.count_nonzero(in_r & in_s) / np.count_nonzero(in_r | in_s)
            scores.append(best)
    return float(np.mean(scores))


def _random_cells(rng, shape, count):
    """Cells as Voronoi regions of random seeds, ids shuffled, with some background."""
    seeds = np.zeros(shape, np.int64)
    seeds[tuple(rng.integers(0, n, count) for n in shape)] = rng.permutation(np.arange(1, count + 1)) * 3
    distance, (rows, cols) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    cells = seeds[rows, cols]
    cells[distance > rng.uniform(4, 9)] = 0
    return cells.astype(np.uint16)


def test_hand_made_frame():
    truth = np.zeros((6, 12), np.uint16)
    truth[0:2, 0:4] = 1     # 8 px, segmented exactly: J = 1
    truth[3:5, 0:4] = 2     # 8 px, segmented object covers exactly half: not > 0.5, J = 0
    truth[0:4, 6:10] = 7    # 16 px, covered by 12 px of an 18 px object: J = 12 / (16 + 18 - 12)
    segmentation = np.zeros_like(truth)
    segmentation[0:2, 0:4] = 5
    segmentation[3:5, 0:2] = 9
    segmentation[3:5, 2:4] = 10
    segmentation[1:4, 6:12] = 3
    table = matches(segmentation, truth)
    value = table.value
    assert table.ids.tolist() == [1, 2, 7] and table.matched.tolist() == [5, 0, 3]
    np.testing.assert_allclose(table.jaccard, [1.0, 0.0, 12 / 22])
    assert value == pytest.approx((1 + 12 / 22) / 3)


def test_unmatched_segments_cost_nothing_and_a_merger_loses_a_cell():
    truth = np.zeros((10, 10), np.uint16)
    truth[1:4, 1:4], truth[1:4, 5:8] = 1, 2
    merged = (truth > 0).astype(np.uint16)  # one segment over both: covers all of each, but the union is both
    merged[8, 8] = 2  # a stray segment matches nothing and is not counted
    assert seg(merged, truth) == pytest.approx(0.5)
    assert seg(truth, truth) == 1.0
    assert seg(np.zeros_like(truth), truth) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_random_frames_agree_with_the_brute_force_loop(seed):
    rng = np.random.default_rng(seed)
    truth = np.stack([_random_cells(rng, (40, 50), 8) for _ in range(3)])
    segmentation = np.stack([_random_cells(rng, (40, 50), 10) for _ in range(2)] + [truth[2]])
    segmentation[0] = np.where(rng.random((40, 50)) < 0.9, truth[0], segmentation[0])  # mostly right
    table = matches(segmentation, truth)
    value = table.value
    assert value == pytest.approx(_brute_force(segmentation, truth), abs=1e-12)
    assert table.per_frame()[2] == 1.0 and table.frames.tolist() == sorted(table.frames.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_py_ctcmetrics(tmp_path, seed):
    """The challenge's SEG as the py-ctcmetrics package computes it from the files of a result folder."""
    rng = np.random.default_rng(10 + seed)
    truth = np.stack([_random_cells(rng, (48, 64), 9) for _ in range(3)])
    segmentation = np.stack([np.where(rng.random((48, 64)) < 0.8, t, _random_cells(rng, (48, 64), 12)) for t in truth])
    segmentation[1] = ndimage.grey_erosion(segmentation[1], size=3)
    references, ious = [], []
    for z in range(len(truth)):
        tifffile.imwrite(tmp_path / f"man_seg{z:03d}.tif", truth[z])
        tifffile.imwrite(tmp_path / f"mask{z:03d}.tif", segmentation[z])
        found = ctc_match(str(tmp_path / f"man_seg{z:03d}.tif"), str(tmp_path / f"mask{z:03d}.tif"))
        references.append(found[0])
        ious.append(found[4])
    assert seg(segmentation, truth) == pytest.approx(ctc_seg(references, ious), abs=1e-12)


@pytest.mark.parametrize("segmentation, truth, message", [
    (np.zeros((4, 4), np.uint16), np.ones((4, 5), np.uint16), "shape"),
    (np.zeros((2, 4, 4), np.uint16), np.stack([np.ones((4, 4), np.uint16), np.zeros((4, 4), np.uint16)]),
     r"truth frame\(s\) \[1\] hold no reference object"),
    (np.full((4, 4), 0.7), np.ones((4, 4), np.uint16), "probabilities into cells"),
    (np.zeros((4, 4), np.int16) - 1, np.ones((4, 4), np.uint16), "negative"),
    (np.zeros((4, 4), np.uint16), np.array([[255, 0, 255, 0]] * 4, np.uint8),
     r"a mask, not cell ids: one value \(255\)"),
    (np.zeros((4, 4), bool), np.ones((4, 4), np.uint16), "dtype bool"),
])
def test_bad_inputs_are_named(segmentation, truth, message):
    with pytest.raises(ValueError, match=message):
        seg(segmentation, truth)


def test_one_cell_per_frame_may_share_one_id():
    truth = np.zeros((2, 6, 6), np.uint8)
    truth[0, 1:3, 1:3] = truth[1, 3:5, 3:5] = 255
    assert seg(truth, truth) == 1.0


def test_command_line_scores_ids_and_probabilities(tmp_path, capsys):
    truth = np.zeros((2, 20, 20), np.uint16)
    truth[:, 2:8, 2:8], truth[:, 10:18, 10:18] = 3, 4
    probabilities = np.zeros(truth.shape, np.float32)
    probabilities[:, 2:8, 2:8] = 0.9
    probabilities[:, 10:18, 10:14] = 0.6  # covers exactly half of cell 4: not matched
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "p.tif", probabilities)
    tifffile.imwrite(tmp_path / "cells.tif", truth[:1])
    assert main(["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "truth.tif"), "--measure", "seg", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seg"] == {"value": 0.5, "objects": 4, "matched": 2, "frames": 2}
    assert result["iou"]["value"] == pytest.approx((36 + 32) / (36 + 64))
    assert main(["evaluate", str(tmp_path / "p.tif"), str(tmp_path / "truth.tif"), "--measure", "seg",
                 "--threshold", "0.7", "--slices", "1"]) == 0
    assert "1 of 2 reference objects" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "cells.tif"), str(tmp_path / "truth.tif"), "--slices", "0",
                 "--measure", "seg"]) == 2
    assert "differ" in capsys.readouterr().err
