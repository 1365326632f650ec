"""ISBI 2012 metrics: hand-computed toy cases, the challenge's own numbers, digital topology,
thresholds, a literal Vincent-Soille watershed, and skimage cross-checks."""
import itertools
import json
from collections import deque

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information

from ronneberger2015 import metrics
from ronneberger2015.__main__ import main
from ronneberger2015.metrics import (
    NEIGHBOURS,
    RING_PIECES,
    SIMPLE,
    SWEEP,
    WARPING_SWEEP,
    dice,
    evaluate,
    iou,
    pixel_error,
    rand_error,
    sweep,
    sweeps,
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
        dict(warping_error=1 / PIXELS, rand_error=268 / 1332, pixel_error=4 / 76, vrand=1064 / 1332,
             vinfo=_split_info_score()),
    ),
    # nothing found: F = 0; unthinned, all 40 pixels singletons: TP = 40, FP = 0,
    # FN = 800 - 40, F = 80/840; thinned, no interior is one segment: TP = 800,
    # FP = 1600 - 800, F = 2/3, and H(B) = 0 so V_info = 0; cells shrink to one pixel
    # each, object deletions that do not count
    "all background": (
        np.zeros(TRUTH.shape),
        dict(warping_error=0, rand_error=1 - 80 / 840, pixel_error=1, vrand=2 / 3, vinfo=0),
    ),
}


@pytest.mark.parametrize("toy", TOYS)
def test_hand_computed_toys(toy):
    proposal, expected = TOYS[toy]
    got = evaluate(proposal, TRUTH)
    assert list(got) == ["warping_error", "rand_error", "pixel_error", "vrand", "vinfo"]
    assert got == pytest.approx(expected, abs=1e-12)
    functions = (("warping_error", warping_error), ("rand_error", rand_error), ("pixel_error", pixel_error),
                 ("vrand", vrand), ("vinfo", vinfo))
    for name, function in functions:
        assert function(proposal, TRUTH) == got[name]


def test_details_hold_every_threshold_and_slice():
    proposal = np.stack([TOYS["one split"][0], TOYS["merged pair"][0]])
    truth = np.stack([TRUTH, TRUTH])
    table = sweep("rand_error", proposal, truth)
    value = table.value
    assert table.values.shape == (11,) and table.per_slice.shape == (11, 2)
    assert table.counts["tp"][:, 0].tolist() == [532] * 11 and table.counts["fn"][:, 1].tolist() == [0] * 11
    assert table.per_slice[0].tolist() == pytest.approx([268 / 1332, 1 / 3])
    # micro: counts summed
    assert value == table.value == pytest.approx(1 - 2 * (532 + 800) / (2 * (532 + 800) + 268 + 800))
    assert table.best == 0 and table.threshold == 0.0  # ties keep the lowest threshold
    table = sweep("vrand", proposal, truth)
    value = table.value
    assert value == pytest.approx((1064 / 1332 + 2 / 3) / 2)  # macro: per-slice scores averaged
    table = sweep("warping_error", proposal, truth)
    value = table.value
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
        table = sweep("pixel_error", np.full((4, 4), value, np.float32), truth)
        assert table.counts["tp"][k, 0] == 16
    table = sweep("pixel_error", np.full((4, 4), 0.5), truth)  # strict: 0.5 > 0.5 is false
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
    """``radius=None``: a split or merger changes the number of 4-connected objects of the whole image."""
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(100):
        warped, target = rng.random((2, 10, 10)) < rng.uniform(0.3, 0.8, (2, 1, 1))
        splits, mergers = topology_errors(warped, target, radius=None)
        before = _components(np.pad(warped, 1))[0]
        for y, x in zip(*np.nonzero(warped != target)):
            flipped = warped.copy()
            flipped[y, x] ^= True
            change = _components(np.pad(flipped, 1))[0] - before
            assert splits[y, x] == (warped[y, x] and change > 0)
            assert mergers[y, x] == (not warped[y, x] and change < 0)
            found += splits[y, x] + mergers[y, x]
    assert found > 1000


def _challenge_classes(warped, target, radius):
    """The challenge's split and merger rule, pixel by pixel as worded, every window relabelled."""
    height, width = warped.shape
    objects = label(warped, connectivity=1)
    splits, mergers = np.zeros((2, height, width), bool)
    for y, x in zip(*np.nonzero(warped != target)):
        near = {objects[y + dy, x + dx] for dy, dx in NEIGHBOURS if 0 <= y + dy < height and 0 <= x + dx < width}
        if len(near - {0}) >= 2:
            (splits if warped[y, x] else mergers)[y, x] = True
        elif len(near - {0}) == 1 and 0 in near and warped[y, x]:
            r = max(height, width) if radius == -1 else radius
            window = np.zeros((2 * r + 1, 2 * r + 1), bool)  # outside the image: background
            for wy, wx in np.ndindex(window.shape):
                if 0 <= y - r + wy < height and 0 <= x - r + wx < width:
                    window[wy, wx] = warped[y - r + wy, x - r + wx]
            window[r, r] = False
            pieces = label(window, connectivity=1)
            splits[y, x] = len({pieces[r + dy, r + dx] for dy, dx in NEIGHBOURS}) > 2
    return splits, mergers


def test_ring_pieces_table():
    for code in range(256):
        assert RING_PIECES[code] == label(_window(code, False), connectivity=1).max()


@pytest.mark.parametrize("radius", [1, 2, 3, -1])
def test_challenge_rule_against_the_plain_definition(radius):
    """The shortcuts (a cut of the whole object, ``RING_PIECES``) change nothing: the same pixels
    as relabelling every window, on random images with thin objects and rings."""
    rng = np.random.default_rng(2)
    splits = mergers = only_in_window = 0
    for _ in range(60):
        warped, target = rng.random((2, 12, 12)) < rng.uniform(0.4, 0.7, (2, 1, 1))
        expected = _challenge_classes(warped, target, radius)
        got = topology_errors(warped, target, radius)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
        splits, mergers = splits + expected[0].sum(), mergers + expected[1].sum()
        only_in_window += np.count_nonzero(expected[0] & ~topology_errors(warped, target, -1)[0])
    assert splits > 100 and mergers > 100
    assert (only_in_window > 20) == (radius != -1)  # splits that only a window sees were tested


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
    table = sweep("warping_error", proposal, truth)
    value = table.value
    assert value * truth.size == width  # the cut shrinks to one pixel per cut row
    assert table.counts["splits"][0, 0] == width and table.counts["mergers"][0, 0] == 0


def test_warping_visits_by_priority_pass_after_pass():
    truth = _cell()
    target = truth.copy()
    target[9, 5:15] = False  # cut row: columns 5..14
    priority = np.ones(truth.shape)
    priority[9, 11] = 0.5
    # pass 1, in column-major order among equals: 5..10 flip (each next to the last flipped), 12 and 13
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
    table = sweep("warping_error", proposal, truth)
    assert table.counts["mergers"][0, 0] == 10 and table.counts["splits"][0, 0] == 0


def test_outside_the_image_is_background():
    truth = np.ones((6, 8), bool)  # one cell filling the image
    proposal = np.ones((6, 8))
    proposal[3] = 0.0  # cut from border to border: flips inwards from the outside, one split left
    table = sweep("warping_error", proposal, truth)
    assert table.counts["splits"][0, 0] == 1 and table.counts["other"][0, 0] == 0


def test_out_of_image_neighbours_are_ignored_not_background():
    truth = np.ones((5, 1), np.uint8)  # a column one pixel wide, cut in the middle
    proposal = np.ones((5, 1))
    proposal[2] = 0.0
    # the cut pixel stays (removing it splits the column); its neighbours inside the image are
    # one object only, a hole deletion for the challenge; the global rule sees the split
    table = sweep("warping_error", proposal, truth)
    assert table.counts["splits"][0, 0] == 0 and table.counts["other"][0, 0] == 1
    assert warping_error(proposal, truth, radius=None) == 1 / 5


def _toy_100x200():
    """An 80 x 80 cell with a 50 x 50 hole beside a second 80 x 80 cell, 20 px of membrane between."""
    truth = np.zeros((100, 200), np.uint8)
    truth[10:90, 10:90] = truth[10:90, 110:190] = 1
    truth[25:75, 25:75] = 0
    return truth


def test_challenge_oracle_toy():
    """The challenge's own code gives 0.005, 0 with radius -1."""
    truth = _toy_100x200()
    table = sweep("warping_error", np.full(truth.shape, 0.5), truth)
    value = table.value
    # below 0.5 all is cell: one membrane column is left between the cells, 100 mergers; from
    # 0.5 on nothing is: the holed cell shrinks to a ring around the hole, larger than the
    # 41 x 41 window, so each ring pixel splits it within its window: 232 splits
    assert table.counts["mergers"][:, 0].tolist() == [100] * 5 + [0] * 5
    assert table.counts["splits"][:, 0].tolist() == [0] * 5 + [232] * 5
    assert value == 0.005 == 100 / truth.size
    whole = sweep("warping_error", np.full(truth.shape, 0.5), truth, radius=-1)
    assert whole.value == 0 and whole.counts["splits"].sum() == 0  # the ring is whole: a hole deletion


def test_window_radius_decides_a_ring():
    truth = np.zeros((13, 13), bool)
    truth[2:11, 2:11] = True
    truth[4:9, 4:9] = False  # a ring 2 px thick around a 5 x 5 hole
    target = np.zeros_like(truth)
    warped = warp(truth, target, np.ones(truth.shape, np.float32))
    ring = np.zeros_like(truth)
    ring[3:10, 3:11] = True
    ring[4:9, 4:10] = False
    assert np.array_equal(warped, ring)  # rows 3-9, columns 3-10, one pixel thick: 26 pixels
    # a ring pixel is a split unless its window holds the whole ring
    assert [topology_errors(warped, target, radius=r)[0].sum() for r in (1, 2, 5)] == [26] * 3
    assert np.argwhere(topology_errors(warped, target, radius=6)[0])[:, 1].tolist() == [3, 10] * 7  # columns 3 and 10
    assert topology_errors(warped, target, radius=7)[0].sum() == 0
    assert topology_errors(warped, target, radius=-1)[0].sum() == 0


def test_a_diagonal_touch_is_a_merger():
    """The challenge looks at 8 neighbours: one isolated target pixel touching two cells only
    diagonally is a merger, though it would join nothing 4-connected."""
    truth = np.zeros((7, 7), np.uint8)
    truth[1:3, 1:3] = truth[4:6, 4:6] = 1
    proposal = truth.astype(float)
    proposal[3, 3] = 1.0  # cannot be added: it would be a new object
    table = sweep("warping_error", proposal, truth)
    assert table.counts["mergers"][:, 0].tolist() == [1] * 10
    assert warping_error(proposal, truth, radius=None) == 0  # an object addition for the global rule


# The top object shrinks to the pixel visited last. Column-major order keeps (0, 3); row-major
# order would keep (1, 2), diagonal to the one-pixel object (2, 1): a split by the 8-neighbour rule.
TIES = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]], bool)


def test_ties_keep_column_major_order():
    target = np.zeros_like(TIES)
    equal = np.ones(TIES.shape, np.float32)
    assert np.argwhere(warp(TIES, target, equal)).tolist() == [[0, 3], [2, 1], [3, 0]]
    assert warping_error(np.zeros(TIES.shape), TIES) == 0
    assert warping_error(np.zeros(TIES.shape), TIES.T) == 1 / 16  # the same image, visited row-major


def test_priorities_are_float32_and_optionally_quantised():
    """At th = 0.5 the priority 0.5 - p decreases along row-major order: the row-major visit (one
    split) where float32 tells the values apart, column-major ties (none) where it does not."""
    rank = np.arange(16).reshape(4, 4)
    for step, quantum, splits in ((1e-12, None, 0), (1e-6, None, 1), (1e-6, 1e-4, 0)):
        proposal = 0.25 + 5e-5 + step * rank
        table = sweep("warping_error", proposal, TIES, quantum=quantum)
        assert table.thresholds[5] == 0.5 and table.counts["splits"][5, 0] == splits, (step, quantum)


# What the challenge's own evaluation code printed for the oracle's three proposals (its README), as
# printed: each value must agree to half a unit of its last digit, the split counts exactly.
CHALLENGE = {
    "dilated-membranes": dict(warping_error="0.000139872", rand_error="0.049022762", pixel_error="0.044366427",
                              vrand="0.9990286", vinfo="0.9986284", splits=110),
    "extra-lines": dict(warping_error="0.000389099", rand_error="0.029737337", pixel_error="0.008881646",
                        vrand="0.98715217", vinfo="0.98953625", splits=306),
    "blurred-noise": dict(warping_error="0.0024236", rand_error="0.025798228", pixel_error="0.031612933",
                          vrand="0.99006466", vinfo="0.98604736"),
}


@pytest.mark.parametrize("proposal", CHALLENGE)
def test_all_five_metrics_agree_with_the_challenges_own_code(metrics_oracle, proposal):
    """ISBI training slices 0, 7 and 29: membranes dilated, cut by extra lines, and blurred with noise
    (a real probability map's thin, noisy and touching borders), scored by the challenge's Fiji classes."""
    truth = tifffile.imread(metrics_oracle / "truth.tif")
    tables = sweeps(tifffile.imread(metrics_oracle / f"{proposal}.tif"), truth)
    expected = dict(CHALLENGE[proposal])
    splits = expected.pop("splits", None)
    for name, printed in expected.items():
        decimals = len(printed.split(".")[1])
        assert abs(tables[name].value - float(printed)) <= 0.5 * 10.0 ** -decimals + 1e-15, name
    warping = tables["warping_error"]
    if splits is not None:
        assert warping.counts["splits"][warping.best].sum() == splits
        assert warping.counts["mergers"][warping.best].sum() == 0


def test_challenge_oracle_isbi_constant_map(isbi):
    """Training labels 20-29 against a constant 0.5 map: the challenge gives 0.002108 (5526 splits)
    and V_info 0. From th = 0.5 on the target is empty and all priorities equal, so one warp per
    slice gives the splits of those 5 thresholds; below, the mergers are many more."""
    truth = isbi.train_labels[20:30] > 0
    empty = np.zeros(truth.shape[1:], bool)
    splits = sum(topology_errors(warp(s, empty, np.zeros(empty.shape, np.float32)), empty)[0].sum() for s in truth)
    assert splits == 5526 and round(splits / truth.size, 6) == 0.002108
    assert vinfo(np.full(truth.shape, 0.5), truth) == 0


def _flooding(mask, order=((0, -1), (-1, 0), (0, 1), (1, 0))):
    """The challenge's thinning as a queue, line by line (docs/metrics.md): markers are the 4-connected
    components of ``mask``; the queue starts with the border pixels next to a marker in column-major
    order; a dequeued pixel takes the one label among its labelled 4-neighbours, else it is a dam (0),
    and queues its neighbours that were never queued, visited in ``order``. No marker: one segment."""
    if not mask.any():
        return np.ones(mask.shape, int)
    height, width = mask.shape
    labels = ndimage.label(mask.T, ndimage.generate_binary_structure(2, 1))[0].T
    queued = mask.copy()

    def neighbours(y, x):
        return [(y + dy, x + dx) for dy, dx in order if 0 <= y + dy < height and 0 <= x + dx < width]

    queue = deque()
    for x in range(width):
        for y in range(height):
            if not mask[y, x] and any(mask[q] for q in neighbours(y, x)):
                queue.append((y, x))
                queued[y, x] = True
    while queue:
        p = queue.popleft()
        found = {labels[q] for q in neighbours(*p) if labels[q] > 0}
        labels[p] = found.pop() if len(found) == 1 else 0
        for q in neighbours(*p):
            if not queued[q]:
                queue.append(q)
                queued[q] = True
    return labels


def test_thinning_is_the_literal_flooding(isbi):
    """thin() against the queue on random masks, smooth blobs and noisy crops of ISBI labels; the order
    in which a pixel queues its neighbours changes no segment (every fourth of the 24 orders)."""
    rng = np.random.default_rng(3)
    masks = [rng.random(rng.integers(1, 15, 2)) < rng.uniform(0.05, 0.7) for _ in range(150)]
    masks += [ndimage.gaussian_filter(rng.random((20, 20)), 1) > 0.5 for _ in range(50)]
    crop = isbi.train_labels[20, :96, :96] > 0
    masks += [ndimage.gaussian_filter(crop.astype(float), 2) + 0.3 * rng.standard_normal(crop.shape) > th
              for th in (0.3, 0.6)]
    orders = list(itertools.permutations(((0, -1), (-1, 0), (0, 1), (1, 0))))[::4]
    dams = 0
    for k, mask in enumerate(masks):
        expected = _flooding(mask)
        assert np.array_equal(thin(mask), expected)
        if k % 10 == 0:
            assert all(np.array_equal(_flooding(mask, order), expected) for order in orders)
        dams += np.count_nonzero(expected[~mask] == 0)
    assert dams > 500


def test_thinning_rules_on_hand_checked_masks():
    mask = np.zeros((5, 9), bool)
    mask[:, :3] = mask[:, 6:] = True  # a border three pixels wide: its middle is reached from both sides
    segments = thin(mask)
    assert (segments[:, :4] == 1).all() and (segments[:, 4] == 0).all() and (segments[:, 5:] == 2).all()
    mask[:, 5] = True  # two pixels wide: the left column is dequeued first and joins 1, the right is a dam
    assert thin(mask)[:, 3].tolist() == [1] * 5 and thin(mask)[:, 4].tolist() == [0] * 5
    # Column-major order: (2, 0), (0, 1), (1, 1), (2, 2) are dequeued in this order; the corner (0, 0)
    # comes after (1, 0) has joined 1 and (0, 1) has joined 2: a dam. Row-major order would join it to 2.
    mask = np.array([[0, 0, 1], [0, 0, 1], [0, 1, 0]], bool)
    assert thin(mask).tolist() == [[0, 2, 2], [1, 0, 2], [1, 1, 0]]
    # Dams queue their neighbours: (1, 1) is a dam and queues (1, 2) before (2, 1) queues (2, 2), so
    # (1, 2) joins 2 and (2, 2) is a dam; if dams queued nothing, (2, 2) would join 1 and (1, 2) be the dam.
    mask = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0]], bool)
    assert thin(mask).tolist() == [[0, 2, 2], [1, 0, 2], [1, 1, 0]]
    # So does a pixel with no labelled neighbour: (2, 2) meets only the dams (2, 1) and (1, 2), is a dam
    # itself and queues (2, 3) before (3, 2) queues (3, 3); so (2, 3) joins 3 and (3, 3) is the dam. If
    # it queued nothing, (3, 3) would join 1 and (2, 3) be the dam.
    mask = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    assert thin(mask).tolist() == [[0, 0, 3, 3], [0, 2, 0, 3], [1, 0, 0, 3], [1, 1, 1, 0]]
    one = np.zeros((4, 4), bool)
    one[1, 2] = True
    assert thin(one).tolist() == [[1] * 4] * 4  # one marker: nothing can disagree with it
    assert thin(np.zeros((4, 4), bool)).tolist() == [[1] * 4] * 4  # no marker: one segment
    assert thin(np.ones((3, 3), bool)).tolist() == [[1] * 3] * 3


def test_vinfo_conventions():
    """Per slice P = I / H(A), R = I / H(B); H(A) = 0 sets P = 0, R = 1, then H(B) = 0 sets
    P = 1, R = 0: F = 0 wherever either side is a single segment, identical partitions
    included. P + R = 0 would be NaN, which the maximum over thresholds skips; after the
    thinning it cannot occur (docs/metrics.md)."""
    one_cell = np.ones((3, 3), np.uint8)
    halves = np.tile([1.0, 0.4, 1.0], (3, 1))  # from 0.4 on: segments left and right, a dam between
    assert vinfo(np.ones((3, 3)), one_cell) == 0  # both sides one segment
    table = sweep("vinfo", halves, one_cell)
    assert table.values.tolist() == [0.0] * 11  # H(A) = 0 (H(B) = 0 too below 0.4)
    # truth rows 0 and 2 (n = 6) against the left and right columns and the dams (0, 1), (2, 1): every
    # joint cell holds 1/6, so H(A, B) = ln 6, H(A) = ln 2, H(B) = 2/3 ln 3 + 1/3 ln 6, I = 1/3 ln 2
    rows = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]], np.uint8)
    table = sweep("vinfo", halves, rows)
    h_b = 2 / 3 * np.log(3) + 1 / 3 * np.log(6)
    assert table.values[:4].tolist() == [0.0] * 4  # below 0.4: one segment
    assert table.values[4:] == pytest.approx([2 / 3 * np.log(2) / (np.log(2) + h_b)] * 7, abs=1e-15)
    assert table.threshold == SWEEP[4]
    scores = metrics._macro_score(SWEEP[:2], np.array([[np.nan], [0.5]]), {})
    assert scores.value == 0.5 and np.isnan(metrics._macro_score(SWEEP[:1], np.array([[np.nan]]), {}).value)


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
    tables = sweeps(proposal.astype(np.float32), truth)
    rand, thinned_rand, info = tables["rand_error"], tables["vrand"], tables["vinfo"]
    for z in range(2):
        objects = label(truth[z] > 0, connectivity=1)
        n = np.count_nonzero(objects)
        for counts, segments in ((rand.counts, label(proposal[z], connectivity=1)),
                                 (thinned_rand.counts, thin(proposal[z]))):
            tp, fp, fn = (counts[key][0, z] for key in ("tp", "fp", "fn"))
            error, precision, recall = adapted_rand_error(objects, _singletons(segments), ignore_labels=(0,))
            assert precision == pytest.approx((tp - n) / (tp + fn - n), rel=1e-12)
            assert recall == pytest.approx((tp - n) / (tp + fp - n), rel=1e-12)
            assert 1 - error != pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-9)  # self-pairs: differ by design
        h_a, h_b, mutual = (info.counts[key][0, z] for key in ("h_truth", "h_proposal", "mutual"))
        test_given_truth, truth_given_test = variation_of_information(objects, _singletons(thin(proposal[z])),
                                                                      ignore_labels=(0,))
        assert test_given_truth * np.log(2) == pytest.approx(h_b - mutual, rel=1e-9)
        assert truth_given_test * np.log(2) == pytest.approx(h_a - mutual, rel=1e-9)
    # the truth against itself on real data: no error, perfect scores
    perfect = dict(warping_error=0, rand_error=0, pixel_error=0, vrand=1, vinfo=1)
    assert evaluate(truth[:1] / 255.0, truth[:1]) == pytest.approx(perfect)


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


@pytest.mark.parametrize(
    "keywords, message",
    [
        (dict(radius=0), "radius 0: pass a whole number >= 1"),
        (dict(radius=-2), "radius -2.*-1 for the whole image"),
        (dict(radius=20.0), "radius 20.0.*None for the global"),
        (dict(quantum=0), "quantum 0: pass a positive step"),
    ],
)
def test_bad_warping_options_are_named(keywords, message):
    with pytest.raises(ValueError, match=message):
        warping_error(TOYS["perfect"][0], TRUTH, **keywords)
    if "radius" in keywords:
        with pytest.raises(ValueError, match=message):
            evaluate(TOYS["perfect"][0], TRUTH, **keywords)


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


def test_each_metric_returns_its_number_and_sweep_its_table():
    proposal, truth = TOYS["one split"][0], TRUTH
    tables = sweeps(proposal, truth)
    for name, function in (("warping_error", warping_error), ("rand_error", rand_error),
                           ("pixel_error", pixel_error), ("vrand", vrand), ("vinfo", vinfo)):
        value = function(proposal, truth)
        assert isinstance(value, float) and value == tables[name].value == sweep(name, proposal, truth).value
    assert evaluate(proposal, truth) == {name: table.value for name, table in tables.items()}
    with pytest.raises(ValueError, match="no metric 'dice'; the metrics are warping_error"):
        sweep("dice", proposal, truth)
