"""ISBI 2012 segmentation metrics (paper Sec. 4, Table 1), computed as the challenge did.

Five numbers compare a probability map with the binary ground truth:

* the challenge's 2015 ranking, the paper's Table 1: the warping error
  (minimum splits and mergers, Jain et al. 2010; a minimum over thresholds),
  the Rand error and the pixel error (each 1 - a maximal F-score);
* its later ranking (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142):
  V_rand and V_info after the proposal's borders are thinned to one pixel.

Conventions shared by all five (docs/metrics.md gives the details):

* ``proposal``: probabilities in [0, 1], 1 = cell interior (the submission
  format; invert a membrane probability first); ``truth``: binary, nonzero =
  cell interior. A 2D image is one slice; a (Z, H, W) stack is scored slice by
  slice, never in 3D.
* At a threshold ``th`` the proposal is binarised with the strict
  ``proposal > th`` in double precision; the truth always with ``truth > 0``,
  so a 0/1 float truth does not vanish at thresholds close to 1.
* Thresholds follow the challenge's ``for (th = 0.0; th <= max; th += 0.1)`` in
  doubles: 11 values up to 0.9999999999999999 (``SWEEP``), and 10 up to 0.9
  for the warping error (``WARPING_SWEEP``, the paper's "10 different levels").
* Objects are 4-connected; the background is 8-connected.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from .io import read_images
from .segmentation import label_cells
from .weightmap import label_reading, target_and_weights

__all__ = [
    "Details",
    "SIMPLE",
    "RING_PIECES",
    "SWEEP",
    "WARPING_SWEEP",
    "thresholds",
    "pixel_error",
    "rand_error",
    "warping_error",
    "vrand",
    "vinfo",
    "iou",
    "dice",
    "seg",
    "matches",
    "Matches",
    "evaluate",
    "sweep",
    "sweeps",
    "METRICS",
    "warp",
    "topology_errors",
    "thin",
]

FOUR = ndimage.generate_binary_structure(2, 1)
EIGHT = ndimage.generate_binary_structure(2, 2)
# The 8 neighbours of a pixel as (dy, dx); bit k of a neighbourhood code is neighbour k.
# The list is point-symmetric: neighbour 7 - k is the opposite of neighbour k.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
FOUR_NEIGHBOURS = (1, 3, 4, 6)  # indices of the 4-neighbours in NEIGHBOURS


def thresholds(stop: float, start: float = 0.0, step: float = 0.1) -> np.ndarray:
    """The challenge's sweep ``for (th = start; th <= stop; th += step)``, accumulated in doubles."""
    values = []
    th = start
    while th <= stop:
        values.append(th)
        th += step
    return np.array(values)


SWEEP = thresholds(1.0)
WARPING_SWEEP = thresholds(0.9)


@dataclass(frozen=True)
class Details:
    """One metric over its threshold sweep.

    ``values[k]`` is the metric at ``thresholds[k]`` and ``per_slice[k, z]`` the
    same for slice z alone; ``counts`` holds the terms behind them, each of shape
    (thresholds, slices); ``best`` indexes the reported value.
    """

    thresholds: np.ndarray
    values: np.ndarray
    per_slice: np.ndarray
    counts: dict[str, np.ndarray]
    best: int

    @property
    def value(self) -> float:
        return float(self.values[self.best])

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.best])


# ---------------------------------------------------------------------------
# Inputs


def _probabilities(proposal: ArrayLike) -> np.ndarray:
    """The proposal as float64 (the challenge compares in double precision), checked to lie in [0, 1]."""
    proposal = np.asarray(proposal)
    if proposal.dtype.kind not in "biuf":
        raise ValueError(f"proposal dtype {proposal.dtype} is not numeric; pass probabilities in [0, 1]")
    proposal = proposal.astype(np.float64)
    if proposal.size == 0:
        raise ValueError("proposal is empty")
    if np.isnan(proposal).any():
        raise ValueError("proposal contains NaN; pass finite probabilities in [0, 1]")
    if proposal.max() > 1.0:
        raise ValueError(
            f"proposal values exceed 1 (max {proposal.max():g}): pass probabilities in [0, 1], "
            "not logits or an 8-bit image (divide uint8 by 255)"
        )
    if proposal.min() < 0.0:
        raise ValueError(
            f"proposal has negative values (min {proposal.min():g}): pass probabilities in [0, 1] "
            "(apply the soft-max), not logits"
        )
    return proposal


def _prepare(proposal: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) float64 proposal and boolean cell interior of the truth, validated."""
    proposal = _probabilities(proposal)
    truth = np.asarray(truth)
    if proposal.shape != truth.shape:
        raise ValueError(f"proposal shape {proposal.shape} and truth shape {truth.shape} differ; "
                         "pass one probability per truth pixel")
    if proposal.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image or a (Z, H, W) stack, got shape {proposal.shape}")
    if truth.dtype.kind not in "biuf":
        raise ValueError(f"truth dtype {truth.dtype} is not numeric; pass a binary mask")
    interior = truth[truth != 0]
    if interior.size and not (interior.min() == interior.max() > 0):
        raise ValueError(
            "truth must be binary, 0 = membrane and one positive value = cell interior "
            f"(found values in [{interior.min():g}, {interior.max():g}] besides 0); "
            "for instance labels pass labels > 0"
        )
    if proposal.ndim == 2:
        return proposal[None], truth[None] > 0
    return proposal, truth > 0


def _truth_objects(inside: np.ndarray) -> list[np.ndarray]:
    """4-connected objects of each truth slice; every slice needs cell interior to score."""
    empty = np.flatnonzero(~inside.any(axis=(1, 2)))
    if empty.size:
        raise ValueError(
            f"truth slice {empty[0]} has no cell interior (nonzero) pixel: the foreground-restricted "
            "scores are undefined there; check the label polarity (nonzero = cell interior)"
        )
    return [ndimage.label(mask, FOUR)[0] for mask in inside]


def _sweep(sweep: np.ndarray, slices: int, measure: Callable[[int, float], tuple]) -> np.ndarray:
    """``measure(z, th)`` for every threshold and slice, as an array (thresholds, slices, terms)."""
    return np.array([[measure(z, th) for z in range(slices)] for th in sweep])


# ---------------------------------------------------------------------------
# F-scores: pixel error, Rand error (Table 1) and V_rand, V_info (thinned)


def _f_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F = 2PR / (P + R) = 2TP / (2TP + FP + FN), elementwise; 1 where neither side has a positive."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    total = 2 * tp + fp + fn
    return np.divide(2 * tp, total, out=np.ones_like(total), where=total > 0)


def _micro_error(sweep: np.ndarray, table: np.ndarray) -> Details:
    """1 - F of TP, FP, FN summed over slices, at each threshold; the minimum is reported."""
    tp, fp, fn = np.moveaxis(table, -1, 0)
    values = 1.0 - _f_score(tp.sum(1), fp.sum(1), fn.sum(1))
    counts = {"tp": tp, "fp": fp, "fn": fn}
    return Details(sweep, values, 1.0 - _f_score(tp, fp, fn), counts, int(np.argmin(values)))


def _macro_score(sweep: np.ndarray, per_slice: np.ndarray, counts: dict) -> Details:
    """The per-slice scores averaged over slices, at each threshold; the maximum is reported.

    A threshold whose mean is NaN (a NaN slice) is skipped, as by the challenge's
    ``>`` comparison; if every threshold is NaN, the value is NaN.
    """
    values = per_slice.mean(axis=1)
    best = 0 if np.isnan(values).all() else int(np.nanargmax(values))
    return Details(sweep, values, per_slice, counts, best)


def _overlap(objects: np.ndarray, segments: np.ndarray) -> tuple:
    """Pixel counts over the truth's cell interior (label > 0).

    Returns the joint counts N_ij of truth object i and proposal segment j >= 1,
    the truth object sizes A_i, the proposal segment sizes B_j (j >= 1), and N_0,
    the number of those pixels where the proposal has label 0.
    """
    inside = objects > 0
    truth_ids, test_ids = objects[inside].astype(np.int64), segments[inside].astype(np.int64)
    assigned = test_ids > 0
    truth_ids, test_ids = truth_ids[assigned], test_ids[assigned]
    joint = np.unique(truth_ids * (test_ids.max(initial=0) + 1) + test_ids, return_counts=True)[1]
    truth_sizes = np.bincount(objects[inside])[1:]
    test_sizes = np.bincount(test_ids)
    return joint, truth_sizes, test_sizes[test_sizes > 0], int(inside.sum() - assigned.sum())


def _rand_counts(joint: np.ndarray, truth_sizes: np.ndarray, test_sizes: np.ndarray,
                 singletons: int) -> tuple[int, int, int]:
    """Foreground-restricted Rand TP, FP, FN in pixel pairs (self-pairs included), from ``_overlap``.

    TP = sum_ij N_ij^2 + N_0, FP = sum_j B_j^2 + N_0 - TP, FN = sum_i A_i^2 - TP:
    the challenge's n^2 sum p_ij^2 etc., where each proposal label-0 pixel is its
    own segment (a singleton, hence + N_0).
    """
    tp = int(joint @ joint) + singletons
    return tp, int(test_sizes @ test_sizes) + singletons - tp, int(truth_sizes @ truth_sizes) - tp


def _information(joint: np.ndarray, truth_sizes: np.ndarray, test_sizes: np.ndarray,
                 singletons: int) -> tuple[float, float, float]:
    """Entropies H(A), H(B) and mutual information I(A;B) in nats, from ``_overlap``.

    A: truth objects, B: proposal segments, each proposal label-0 pixel a singleton
    (Arganda-Carreras et al. 2015: sum_B = sum_j b_j ln b_j - P_0 ln n and
    sum_AB = sum_ij p_ij ln p_ij - P_0 ln n).
    """
    n = int(truth_sizes.sum())

    def sum_p_log_p(counts):
        p = counts / n
        return float(p @ np.log(p))

    singleton_term = singletons / n * np.log(n)
    sum_a = sum_p_log_p(truth_sizes)
    sum_b = sum_p_log_p(test_sizes) - singleton_term
    sum_ab = sum_p_log_p(joint) - singleton_term
    return -sum_a, -sum_b, sum_ab - sum_a - sum_b


def _information_f(h_a: np.ndarray, h_b: np.ndarray, info: np.ndarray) -> np.ndarray:
    """F = 2PR / (P + R) with P = I / H(A), R = I / H(B), elementwise, with the challenge's conventions.

    H(A) = 0 sets P = 0, R = 1; then H(B) = 0 sets P = 1, R = 0. So F = 0
    wherever either side is a single segment, both sides included. P + R = 0
    gives NaN, which ``_macro_score`` skips.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = info / h_a, info / h_b
        precision, recall = np.where(h_a == 0, 0.0, precision), np.where(h_a == 0, 1.0, recall)
        precision, recall = np.where(h_b == 0, 1.0, precision), np.where(h_b == 0, 0.0, recall)
        return 2 * precision * recall / (precision + recall)


def _segments(mask: np.ndarray) -> np.ndarray:
    return ndimage.label(mask, FOUR)[0]


# The 4-neighbours in the order a dequeued pixel queues them, as (dy, dx): left, up, right, down.
# No test has found a mask whose segments depend on this order (test_thinning_is_the_literal_flooding).
FLOODING_ORDER = ((0, -1), (-1, 0), (0, 1), (1, 0))


def _one_label(candidates: np.ndarray) -> np.ndarray:
    """For each column of ``candidates`` (labels, 0 = none): its label if exactly one label > 0 occurs, else 0."""
    highest = candidates.max(axis=0)
    lowest = np.where(candidates > 0, candidates, highest).min(axis=0)
    return np.where(lowest == highest, highest, 0)


def thin(mask: np.ndarray) -> np.ndarray:
    """Segments of a binary proposal after border thinning, as the ISBI 2012 challenge computed them.

    A flooding from markers with dams (Meyer 1991) on a border of one level.
    The markers are the 4-connected components of ``mask`` (cell interior). A
    first-in first-out queue starts with every border pixel that has a marker
    4-neighbour, in column-major order (x outer, y inner). A dequeued pixel
    takes the label of its labelled 4-neighbours if they all carry the same
    one; otherwise (two labels or more, or none) it is a dam, label 0. Either
    way it then queues those of its 4-neighbours that were never queued. Dams
    are final. Without interior pixels the whole image is one segment, as with
    one marker. docs/metrics.md gives the evidence for each rule: the
    challenge's own numbers.

    The queue visits the border in layers of city-block distance d to the
    interior. A pixel's label depends on its neighbours in layer d - 1 and on
    those in its own layer that were dequeued before it, so each layer is
    labelled with array operations: its queue order follows from the previous
    layer's (the first neighbour that queued the pixel, then
    ``FLOODING_ORDER``), and its labelling is repeated until it no longer
    changes. As "dequeued before" has no cycles, the repetition ends with the
    queue's labels; the tests compare them with a transcription of the queue.
    Returns the labels; dams are 0 (singletons for the scores).
    """
    mask = np.asarray(mask, bool)
    basins = ndimage.label(mask.T, FOUR)[0].T  # numbered in column-major scan order
    if basins.max() < 2:  # no marker: one segment (an empty proposal's V_info is 0); one: all agree
        return np.ones_like(basins)
    height, width = mask.shape
    labels = np.pad(basins, 1).ravel().astype(np.int64)
    distance = np.pad(np.where(mask, 0, -1), 1, constant_values=-2).ravel()  # -1: not queued yet, -2: outside
    steps = np.array([dy * (width + 2) + dx for dy, dx in FLOODING_ORDER])[:, None]
    rank = np.zeros(labels.size, np.int64)  # queue position within the pixel's layer
    xs, ys = np.nonzero(((~mask) & ndimage.binary_dilation(mask, FOUR)).T)  # the first layer, column-major
    layer, d = (ys + 1) * (width + 2) + xs + 1, 1
    while layer.size:
        distance[layer] = d
        rank[layer] = np.arange(layer.size)
        around = layer + steps
        near = distance[around]
        previous = np.where(near == d - 1, labels[around], 0)
        labels[layer] = _one_label(previous)
        order = rank[around] - rank[layer]  # < 0: dequeued before the pixel
        earlier, later = (near == d) & (order < 0), (near == d) & (order > 0)
        todo = np.flatnonzero(earlier.any(axis=0))  # positions in the layer whose label may still change
        while todo.size:  # until no label changes; only a changed label's later neighbours can change next
            same = np.where(earlier[:, todo], labels[around[:, todo]], 0)
            again = _one_label(np.concatenate([previous[:, todo], same]))
            changed = todo[again != labels[layer[todo]]]
            labels[layer[todo]] = again
            todo = np.unique(rank[around[:, changed][later[:, changed]]])
        queued = around.T[near.T == -1]  # the next layer: each pixel queued by its first queueing neighbour
        layer, d = queued[np.sort(np.unique(queued, return_index=True)[1])], d + 1
    return labels.reshape(height + 2, width + 2)[1:-1, 1:-1]


def _pixel(proposal: np.ndarray, inside: np.ndarray) -> Details:
    def counts(z, th):
        test = proposal[z] > th
        tp = np.count_nonzero(test & inside[z])
        return tp, np.count_nonzero(test) - tp, np.count_nonzero(inside[z]) - tp

    return _micro_error(SWEEP, _sweep(SWEEP, len(proposal), counts))


def _rand(proposal: np.ndarray, inside: np.ndarray) -> Details:
    objects = _truth_objects(inside)

    def counts(z, th):
        return _rand_counts(*_overlap(objects[z], _segments(proposal[z] > th)))

    return _micro_error(SWEEP, _sweep(SWEEP, len(proposal), counts))


def _thinned(proposal: np.ndarray, inside: np.ndarray) -> tuple[Details, Details]:
    """V_rand and V_info from one thinning per threshold and slice."""
    objects = _truth_objects(inside)

    def terms(z, th):
        overlap = _overlap(objects[z], thin(proposal[z] > th))
        return _rand_counts(*overlap) + _information(*overlap)

    tp, fp, fn, h_a, h_b, info = np.moveaxis(_sweep(SWEEP, len(proposal), terms), -1, 0)
    return (
        _macro_score(SWEEP, _f_score(tp, fp, fn), {"tp": tp, "fp": fp, "fn": fn}),
        _macro_score(SWEEP, _information_f(h_a, h_b, info), {"h_truth": h_a, "h_proposal": h_b, "mutual": info}),
    )


def pixel_error(proposal: ArrayLike, truth: ArrayLike) -> float:
    """Pixel error of Table 1: 1 - maximal F-score of the pixel classification.

    Cell interior is the positive class (truth > 0 against proposal > th); TP,
    FP and FN are summed over slices before the F-score; thresholds ``SWEEP``.
    ``sweep("pixel_error", ...)`` gives the table; counts "tp", "fp", "fn" in pixels.
    """
    return _pixel(*_prepare(proposal, truth)).value


def rand_error(proposal: ArrayLike, truth: ArrayLike) -> float:
    """Rand error of Table 1: 1 - maximal F-score of the foreground-restricted Rand index.

    Pairs of pixels are counted over the truth's cell interior only; truth
    objects and proposal segments are the 4-connected components, and a proposal
    background pixel is a segment of its own (see ``_rand_counts``). TP, FP and
    FN are summed over slices; thresholds ``SWEEP``; no thinning.
    ``sweep("rand_error", ...)`` gives the table; counts "tp", "fp", "fn" in pixel pairs.
    """
    return _rand(*_prepare(proposal, truth)).value


def vrand(proposal: ArrayLike, truth: ArrayLike) -> float:
    """V_rand (thinned), the later ISBI 2012 ranking: maximal foreground-restricted Rand F-score.

    As ``rand_error`` but the proposal's segments come from ``thin`` (its
    one-pixel dams are singletons), and the F-score is taken per slice and
    averaged over slices before the maximum over ``SWEEP``. Higher is better;
    ``sweep("vrand", ...)`` gives the table; counts "tp", "fp", "fn".
    """
    return _thinned(*_prepare(proposal, truth))[0].value


def vinfo(proposal: ArrayLike, truth: ArrayLike) -> float:
    """V_info (thinned), the later ISBI 2012 ranking: maximal information-theoretic F-score.

    Segments as in ``vrand``; per slice F = 2I / (H(A) + H(B)) over the truth's
    cell interior (see ``_information_f`` for the edge cases), averaged over
    slices, maximum over ``SWEEP``. Higher is better; ``sweep("vinfo", ...)``
    gives the table; counts "h_truth", "h_proposal", "mutual" in nats.
    """
    return _thinned(*_prepare(proposal, truth))[1].value


# ---------------------------------------------------------------------------
# Warping error (Jain et al. 2010)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Per pixel, the 8-bit code of its foreground neighbours (bit k: ``NEIGHBOURS[k]``); outside is background."""
    height, width = mask.shape
    padded = np.pad(mask, 1).astype(np.uint8)
    code = np.zeros(mask.shape, np.uint8)
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        code |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] << k
    return code


def _ring(code: int) -> np.ndarray:
    """The 3x3 neighbourhood described by a neighbourhood code, its centre off."""
    ring = np.zeros((3, 3), bool)
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        ring[1 + dy, 1 + dx] = code >> k & 1
    return ring


def _is_simple(code: int) -> bool:
    """The simple-point test for 4-connected objects and 8-connected background.

    A pixel p is simple iff its topological numbers are both 1 (Bertrand &
    Malandain 1994, in 2D): T4, the number of 4-connected components of the
    objects in the 8-neighbourhood of p (p excluded) that touch p's 4-neighbours,
    and T8, the number of 8-connected components of the background there. The
    test does not depend on p's own value.
    """
    ring = _ring(code)
    objects = ndimage.label(ring, FOUR)[0]
    t4 = len({objects[1 + NEIGHBOURS[k][0], 1 + NEIGHBOURS[k][1]] for k in FOUR_NEIGHBOURS} - {0})
    background = ~ring
    background[1, 1] = False
    t8 = ndimage.label(background, EIGHT)[1]
    return t4 == 1 and t8 == 1


SIMPLE = np.array([_is_simple(code) for code in range(256)])
"""``SIMPLE[code]``: is a pixel with that neighbourhood code (bit k = ``NEIGHBOURS[k]``) simple."""

RING_PIECES = np.array([ndimage.label(_ring(code), FOUR)[1] for code in range(256)])
"""``RING_PIECES[code]``: the 4-connected object components among the 8 neighbours alone."""


def warp(image: np.ndarray, target: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Warp a binary image towards ``target`` by flipping simple points only (Jain et al. 2010).

    The pixels where ``image`` and ``target`` differ are visited in order of
    decreasing ``priority``, a stable sort whose ties keep column-major order
    (x outer, y inner), as the challenge lists them; each one that is simple in
    the current image at its visit is flipped to agree with ``target``. The
    passes repeat over the pixels still differing until one pass flips none.
    Simplicity is that of ``SIMPLE``; outside the image is background that never
    changes. Returns the warped image (bool).
    """
    image, target = np.asarray(image, bool), np.asarray(target, bool)
    height, width = image.shape
    padded = np.pad(image, 1)
    codes = bytearray(_neighbour_codes(padded).tobytes())
    steps = [dy * (width + 2) + dx for dy, dx in NEIGHBOURS]
    # when pixel i flips, its neighbour i + steps[k] sees it as neighbour 7 - k
    updates = [(step, 1 << (7 - k)) for k, step in enumerate(steps)]
    columns = np.flatnonzero((padded != np.pad(target, 1)).T)  # column-major: x outer, y inner
    differ = columns % (height + 2) * (width + 2) + columns // (height + 2)
    keys = np.pad(priority, 1).ravel()[differ]
    pending = differ[np.argsort(-keys, kind="stable")].tolist()
    simple = SIMPLE.tolist()
    while True:
        kept = []
        for i in pending:
            if simple[codes[i]]:
                for step, bit in updates:
                    codes[i + step] ^= bit
            else:
                kept.append(i)
        if len(kept) == len(pending):
            break
        pending = kept
    warped = np.pad(target, 1).ravel()
    warped[pending] = padded.ravel()[pending]
    return warped.reshape(height + 2, width + 2)[1:-1, 1:-1]


def _distinct_labels(labels: np.ndarray) -> np.ndarray:
    """Per row of ``labels``, the number of distinct positive values."""
    ordered = np.sort(np.maximum(labels, 0), axis=1)
    return 1 + np.count_nonzero(np.diff(ordered, axis=1), axis=1) - (ordered[:, 0] == 0)


def _check_radius(radius: int | None) -> None:
    if radius is not None and not (isinstance(radius, (int, np.integer)) and (radius >= 1 or radius == -1)):
        raise ValueError(f"radius {radius!r}: pass a whole number >= 1 (the challenge: 20), -1 for the whole image, "
                         "or None for the global topological rule")


def _split_in_window(warped: np.ndarray, y: int, x: int, radius: int) -> bool:
    """Removing (y, x) from ``warped`` inside the (2r + 1)^2 window centred on it, do its
    8 neighbours fall into two or more 4-connected objects of that window?"""
    top, left = max(y - radius, 0), max(x - radius, 0)
    window = warped[top : y + radius + 1, left : x + radius + 1].copy()
    window[y - top, x - left] = False
    labels = ndimage.label(window, FOUR)[0]
    near = labels[max(y - top - 1, 0) : y - top + 2, max(x - left - 1, 0) : x - left + 2]
    return np.unique(near[near > 0]).size >= 2


def topology_errors(warped: np.ndarray, target: np.ndarray, radius: int | None = 20) -> tuple[np.ndarray, np.ndarray]:
    """The split and merger pixels among the pixels where ``warped`` and ``target`` differ.

    Each such pixel p is judged alone against ``warped`` (W), whose objects are
    its 4-connected components. The challenge's rule (``radius`` r >= 1, or -1
    for the whole image) looks at U, the distinct labels of W (0 = background)
    among p's 8 neighbours inside the image; neighbours outside are ignored:

    * two or more objects in U: a split if p is in W, a merger if not;
    * one object and 0, p in W: a split if, with p removed inside the
      (2r + 1) x (2r + 1) window centred on p (outside the image is
      background), p's neighbours fall into two or more 4-connected objects of
      the window; else a hole deletion;
    * anything else adds or deletes an object or a hole and is not counted.

    ``radius=None`` is the global topological rule instead, not the challenge's:
    a merger joins two or more objects through p's 4-neighbours; a split cuts
    p's object into more objects, anywhere in the image.

    Whether removing p cuts its object anywhere in the image comes from the
    Euler number, objects - holes = V - E + F (pixels, 4-adjacent pairs, 2x2
    squares; background 8-connected, outside background): removing p changes
    the number of objects by n4 - q - k, with n4 object 4-neighbours, q 2x2
    squares of object pixels through p, and k distinct background components
    among p's 8 neighbours. That is the global rule's split, and for the
    challenge's rule a split in every window. Where p does not cut its object,
    a window can only separate p's object neighbours if they are disconnected
    among themselves (``RING_PIECES``); only then is the window relabelled.
    Returns two boolean masks, (splits, mergers).
    """
    _check_radius(radius)
    warped, target = np.asarray(warped, bool), np.asarray(target, bool)
    w = np.pad(warped, 1)
    ys, xs = np.nonzero(w != np.pad(target, 1))

    def around(array, offsets):
        return np.stack([array[ys + dy, xs + dx] for dy, dx in offsets], axis=1)

    added = ~w[ys, xs]
    ring = around(w, NEIGHBOURS)  # 0 1 2 / 3 . 4 / 5 6 7
    n4 = ring[:, FOUR_NEIGHBOURS].sum(axis=1)
    squares = sum(ring[:, list(square)].all(axis=1) for square in ((0, 1, 3), (1, 2, 4), (3, 5, 6), (4, 6, 7)))
    background = ndimage.label(~w, EIGHT)[0]
    cut = ~added & (n4 - squares - _distinct_labels(around(background, NEIGHBOURS)) > 0)
    if radius is None:
        objects = ndimage.label(w, FOUR)[0]
        mergers = added & (_distinct_labels(around(objects, [NEIGHBOURS[k] for k in FOUR_NEIGHBOURS])) >= 2)
        splits = cut
    else:
        objects = np.pad(ndimage.label(warped, FOUR)[0], 1, constant_values=-1)  # outside: ignored
        near = around(objects, NEIGHBOURS)
        many = _distinct_labels(near) >= 2
        mergers = added & many
        hole = ~added & (_distinct_labels(near) == 1) & (near == 0).any(axis=1)
        splits = ~added & many | hole & cut
        if radius != -1:
            codes = ring @ (1 << np.arange(8))
            for i in np.flatnonzero(hole & ~cut & (RING_PIECES[codes] >= 2)):
                splits[i] = _split_in_window(warped, ys[i] - 1, xs[i] - 1, radius)

    def image_of(selected):
        mask = np.zeros(warped.shape, bool)
        mask[ys[selected] - 1, xs[selected] - 1] = True
        return mask

    return image_of(splits), image_of(mergers)


def _priorities(distance: np.ndarray, quantum: float | None) -> np.ndarray:
    """The warping's sort keys from |proposal - th| (double): rounded to float32 as the challenge
    does, or with ``quantum`` truncated to its multiples (the challenge before mid-2015: 1e-4)."""
    return distance.astype(np.float32) if quantum is None else np.floor(distance / quantum)


def _warping(proposal: np.ndarray, inside: np.ndarray, radius: int | None, quantum: float | None) -> Details:
    _check_radius(radius)
    if quantum is not None and not quantum > 0:
        raise ValueError(f"quantum {quantum!r}: pass a positive step (the challenge before mid-2015: 1e-4) or None")

    def counts(z, th):
        target = proposal[z] > th
        warped = warp(inside[z], target, _priorities(np.abs(proposal[z] - th), quantum))
        splits, mergers = topology_errors(warped, target, radius)
        return splits.sum(), mergers.sum(), np.count_nonzero(warped != target) - splits.sum() - mergers.sum()

    splits, mergers, other = np.moveaxis(_sweep(WARPING_SWEEP, len(proposal), counts), -1, 0)
    pixels = proposal[0].size
    values = (splits + mergers).sum(axis=1) / (pixels * len(proposal))
    counts = {"splits": splits, "mergers": mergers, "other": other}
    return Details(WARPING_SWEEP, values, (splits + mergers) / pixels, counts, int(np.argmin(values)))


def warping_error(proposal: ArrayLike, truth: ArrayLike, *, radius: int | None = 20,
                  quantum: float | None = None) -> float:
    """Warping error of Table 1: minimum splits and mergers (Jain et al. 2010), as the challenge computed it.

    Per slice and threshold th of ``WARPING_SWEEP``, the truth is warped
    towards ``proposal > th`` by ``warp`` with priority |proposal - th| computed
    in double and rounded to float32 (the most confident disagreements first;
    ``quantum`` truncates it to multiples instead); of the pixels still
    differing, those ``topology_errors`` finds to be splits or mergers with
    ``radius`` (the challenge's 20; -1: the whole image; None: the global
    topological rule, not the challenge's) are counted. The error is their
    number over all slices divided by the number of pixels; the minimum over
    thresholds is reported. ``sweep("warping_error", ...)`` gives the table;
    counts "splits", "mergers" and "other" (remaining pixels not counted).
    """
    return _warping(*_prepare(proposal, truth), radius, quantum).value


# ---------------------------------------------------------------------------
# Foreground overlap: IOU (Jaccard index) and Dice


def _foreground(proposal: ArrayLike, truth: ArrayLike, threshold: float) -> tuple[int, int, int]:
    """Pixel counts |P & T|, |P|, |T| of P = ``proposal > threshold`` and T = ``truth > 0`` over all slices."""
    proposal, inside = _prepare(proposal, truth)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    predicted = proposal > threshold
    return int(np.count_nonzero(predicted & inside)), int(np.count_nonzero(predicted)), int(np.count_nonzero(inside))


def iou(proposal: ArrayLike, truth: ArrayLike, *, threshold: float = 0.5) -> float:
    """Foreground intersection over union |P & T| / |P | T| of P = ``proposal > threshold`` and T = ``truth > 0``.

    Pixels of all slices are counted together; 1 where both are empty. This is
    the plain pixel IOU of the cell class, not the cell tracking challenge's
    object-wise SEG measure.
    """
    both, predicted, true = _foreground(proposal, truth, threshold)
    union = predicted + true - both
    return both / union if union else 1.0


def dice(proposal: ArrayLike, truth: ArrayLike, *, threshold: float = 0.5) -> float:
    """Foreground Dice coefficient 2 |P & T| / (|P| + |T|), with P and T as in ``iou``; 1 where both are empty."""
    both, predicted, true = _foreground(proposal, truth, threshold)
    return 2 * both / (predicted + true) if predicted + true else 1.0


# ---------------------------------------------------------------------------
# Cell tracking challenge: the SEG measure (Table 2)


@dataclass(frozen=True)
class Matches:
    """The terms of SEG: one entry per reference object, ordered by frame, then id.

    ``frames[k]`` and ``ids[k]`` name reference object k; ``matched[k]`` is the
    id of the segmented object that covers more than half of it (0: none) and
    ``jaccard[k]`` the Jaccard index of the two (0 where none).
    """

    frames: np.ndarray
    ids: np.ndarray
    matched: np.ndarray
    jaccard: np.ndarray

    @property
    def value(self) -> float:
        return float(self.jaccard.mean())

    def per_frame(self) -> dict[int, float]:
        """SEG of each frame alone: ``{frame: mean Jaccard index of its reference objects}``."""
        return {int(z): float(self.jaccard[self.frames == z].mean()) for z in np.unique(self.frames)}


def _instances(labels: ArrayLike, name: str) -> np.ndarray:
    """``labels`` as a checked (Z, H, W) int64 stack of cell ids (0 = background)."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or labels.size == 0:
        raise ValueError(f"{name}: expected an (H, W) image or a (Z, H, W) stack of cell ids, got shape {labels.shape}")
    if labels.dtype == bool or labels.dtype.kind not in "iuf":
        raise ValueError(f"{name} dtype {labels.dtype}: SEG needs one integer id per cell (0 = background)")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise ValueError(f"{name} holds fractions, not cell ids: turn probabilities into cells first "
                             "(ronneberger2015.label_cells, or evaluate --measure seg --threshold T)")
    if labels.min() < 0:
        raise ValueError(f"{name} has negative values; cell ids are positive and 0 is background")
    labels = labels.astype(np.int64)
    stack = labels[None] if labels.ndim == 2 else labels
    values = np.unique(stack)
    if values.size == 2 and values[0] == 0:  # one value for every cell: a mask, unless each frame has one region
        pieces = [ndimage.label(frame, FOUR)[1] for frame in stack]
        if max(pieces) > 1:
            raise ValueError(f"{name} is a mask, not cell ids: one value ({values[1]}) covers {max(pieces)} separate "
                             "regions of a frame, which SEG would score as one cell; give each cell its own id "
                             "(e.g. scipy.ndimage.label)")
    return stack


def _frame_matches(segmentation: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reference ids, their matched segmented ids (0: none) and Jaccard indices, for one frame."""
    ids, sizes = np.unique(truth[truth > 0], return_counts=True)
    both = (truth > 0) & (segmentation > 0)
    stride = int(segmentation.max()) + 1
    pairs, overlap = np.unique(truth[both] * stride + segmentation[both], return_counts=True)
    reference, segmented = np.divmod(pairs, stride)
    row = np.searchsorted(ids, reference)
    covers = 2 * overlap > sizes[row]  # |R & S| > 0.5 |R|: at most one S per R
    row, segmented, overlap = row[covers], segmented[covers], overlap[covers]
    segmented_sizes = np.bincount(segmentation.ravel(), minlength=stride)[segmented]
    matched, jaccard = np.zeros(ids.size, np.int64), np.zeros(ids.size)
    matched[row] = segmented
    jaccard[row] = overlap / (sizes[row] + segmented_sizes - overlap)
    return ids, matched, jaccard


def matches(segmentation: ArrayLike, truth: ArrayLike) -> Matches:
    """The reference objects of SEG (see ``seg``), each with its matched segmented object and Jaccard index.

    ``segmentation`` and ``truth`` hold one id per cell (0 = background), as
    (H, W) or (Z, H, W) frames of one shape. A reference object R (an id of
    ``truth`` in a frame) is matched by the segmented object S that covers
    more than half of it, |R & S| > 0.5 |R| (at most one S can); its score is
    the Jaccard index |R & S| / |R | S|, and 0 where no S matches. SEG is the
    mean over all reference objects of all frames. Segmented objects that
    match nothing cost nothing.
    """
    segmentation, truth = _instances(segmentation, "segmentation"), _instances(truth, "truth")
    if segmentation.shape != truth.shape:
        raise ValueError(f"segmentation shape {segmentation.shape} and truth shape {truth.shape} differ; "
                         "give one segmented frame per annotated frame")
    empty = [z for z, frame in enumerate(truth) if not frame.any()]
    if empty:
        raise ValueError(f"truth frame(s) {empty} hold no reference object: SEG averages over reference objects "
                         "and is undefined for them; leave unannotated frames out")
    columns = []
    for z, (proposed, reference) in enumerate(zip(segmentation, truth)):
        ids, matched, jaccard = _frame_matches(proposed, reference)
        columns.append((np.full(ids.size, z), ids, matched, jaccard))
    return Matches(*(np.concatenate(column) for column in zip(*columns)))


def seg(segmentation: ArrayLike, truth: ArrayLike) -> float:
    """SEG, the cell tracking challenge's segmentation measure (Maška et al. 2014; Ulman et al. 2017): the
    mean Jaccard index of the reference objects with the segmented objects that cover more than half of
    them (``matches`` gives the table)."""
    return matches(segmentation, truth).value


def _seg_command(proposal: np.ndarray, truth: np.ndarray, args: argparse.Namespace) -> int:
    """``evaluate --measure seg``: SEG and the foreground IOU of cell ids, or of probabilities at ``--threshold``."""
    if args.slices:
        chosen = _slice_range(args.slices, len(proposal))
        proposal, truth = proposal[chosen], truth[chosen]
    if proposal.dtype.kind == "f":
        proposal = _probabilities(proposal)
        cells = label_cells(1.0 - proposal if args.membrane else proposal, args.threshold)
        source = f"cells: 4-connected components of P(cell) > {args.threshold:g}"
    else:
        cells, source = proposal, "cells: the ids as given"
    if args.instances is False:
        truth = label_cells((np.asarray(truth) > 0).astype(np.float32))
    table = matches(cells, truth)
    value = table.value
    overlap = iou((cells > 0).astype(np.float32), truth > 0)
    counts = {"objects": int(table.ids.size), "matched": int(np.count_nonzero(table.matched)),
              "frames": len(truth)}
    if args.json:
        print(json.dumps({"seg": {"value": value, **counts}, "iou": {"value": overlap},
                          "seg_by_frame": table.per_frame()}, indent=2))
        return 0
    print(f"{'measure':<18} {'value':>10}  better")
    print(f"{'SEG':<18} {value:>10.7f}  higher   {counts['matched']} of {counts['objects']} reference objects "
          f"matched in {counts['frames']} frame(s)")
    print(f"{'foreground IOU':<18} {overlap:>10.7f}  higher")
    print(source)
    return 0


# ---------------------------------------------------------------------------
# All five, and the command line

METRICS = {
    "warping_error": ("warping error", "lower"),
    "rand_error": ("Rand error", "lower"),
    "pixel_error": ("pixel error", "lower"),
    "vrand": ("V_rand (thinned)", "higher"),
    "vinfo": ("V_info (thinned)", "higher"),
}
"""The names ``evaluate`` returns, Table 1's three first, with a label and which direction is better."""


def sweep(name: str, proposal: ArrayLike, truth: ArrayLike, *, radius: int | None = 20,
          quantum: float | None = None) -> Details:
    """One metric of ``METRICS`` over its threshold sweep: its value at every threshold, per slice, and the
    counts behind them; ``.value`` is the number the metric's own function returns (``radius`` and
    ``quantum`` are the warping error's)."""
    if name not in METRICS:
        raise ValueError(f"no metric {name!r}; the metrics are {', '.join(METRICS)}")
    proposal, inside = _prepare(proposal, truth)
    if name == "warping_error":
        return _warping(proposal, inside, radius, quantum)
    if name in ("vrand", "vinfo"):
        return _thinned(proposal, inside)[name == "vinfo"]
    return (_pixel if name == "pixel_error" else _rand)(proposal, inside)


def sweeps(proposal: ArrayLike, truth: ArrayLike, *, radius: int | None = 20) -> dict[str, Details]:
    """All five metrics over their sweeps, ``{name: Details}``, with the thinning shared by V_rand and V_info."""
    proposal, inside = _prepare(proposal, truth)
    tables = dict(warping_error=_warping(proposal, inside, radius, None), rand_error=_rand(proposal, inside),
                  pixel_error=_pixel(proposal, inside))
    tables.update(zip(("vrand", "vinfo"), _thinned(proposal, inside)))
    return {name: tables[name] for name in METRICS}


def evaluate(proposal: ArrayLike, truth: ArrayLike, *, radius: int | None = 20) -> dict[str, float]:
    """All five metrics, ``{name: value}``: the same numbers as the five functions (``radius`` is the warping
    error's), with the thinning shared by V_rand and V_info."""
    return {name: table.value for name, table in sweeps(proposal, truth, radius=radius).items()}


def _slice_range(text: str, count: int) -> slice:
    first, _, last = text.partition("-")
    try:
        start, stop = int(first), int(last or first) + 1
    except ValueError:
        raise ValueError(f"--slices {text!r}: expected A-B or A, e.g. 20-29") from None
    if not 0 <= start < stop <= count:
        raise ValueError(f"--slices {text!r}: the stack has slices 0-{count - 1}")
    return slice(start, stop)


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``evaluate PROPOSAL TRUTH``: the five ISBI 2012 metrics, foreground IOU and Dice, as a table or JSON."""
    parser = argparse.ArgumentParser(prog=prog, description="ISBI 2012 metrics (paper Sec. 4) of a probability "
                                     "map against labels, and the foreground IOU and Dice at a threshold.")
    parser.add_argument("proposal", type=Path, help="probabilities in [0, 1], 1 = cell interior: a TIFF (an image "
                        "or a stack) or a folder of them")
    parser.add_argument("truth", type=Path, help="labels, 0 = membrane/background, nonzero = cell: a binary mask or "
                        "instance ids (scored against their separated mask), as a file or folder")
    parser.add_argument("--membrane", action="store_true",
                        help="the proposal is a membrane probability; score 1 - proposal")
    parser.add_argument("--slices", metavar="A-B",
                        help="score only slices A to B of a stack (0-based, inclusive), e.g. 20-29")
    reading = parser.add_mutually_exclusive_group()
    reading.add_argument("--instances", action="store_const", const=True, dest="instances",
                         help="read the truth as cell ids even if it holds one nonzero value")
    reading.add_argument("--binary", action="store_const", const=False, dest="instances",
                         help="read the truth as a mask (nonzero = cell) even if it holds several values")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="T",
                        help="P(cell) > T is cell for the IOU and Dice (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--measure", choices=("isbi", "seg"), default="isbi",
                        help="isbi (default): the five ISBI 2012 metrics, foreground IOU and Dice; seg: the cell "
                        "tracking challenge's SEG and foreground IOU of cell ids (the proposal: ids, or "
                        "probabilities cut at --threshold) against instance truth")
    args = parser.parse_args(argv)
    proposal, truth = (read_images(path)[0] for path in (args.proposal, args.truth))
    if proposal.shape != truth.shape:
        raise ValueError(f"the proposal ({len(proposal)} slice(s) of {proposal.shape[1]}x{proposal.shape[2]}) and "
                         f"the truth ({len(truth)} of {truth.shape[1]}x{truth.shape[2]}) differ; give one "
                         "probability map per label image")
    if args.measure == "seg":
        return _seg_command(proposal, truth, args)
    proposal = _probabilities(proposal)
    if args.membrane:
        proposal = 1.0 - proposal
    if args.slices:
        chosen = _slice_range(args.slices, len(proposal))
        proposal, truth = proposal[chosen], truth[chosen]
    labels = label_reading(truth, args.instances)
    if labels.instances:
        print(f"{labels}; scored against their separated mask", file=sys.stderr)
    truth = target_and_weights(truth, w0=0.0, instances=args.instances, class_balance=False)[0]
    results = sweeps(proposal, truth)  # validates values first
    interior = truth > 0
    if interior.any() and not interior.all() and proposal[interior].mean() < proposal[~interior].mean():
        print("warning: the proposal is higher where the truth is 0 than where it is nonzero: either the proposal "
              "is a membrane probability (pass --membrane), or the truth marks membrane as nonzero (the convention "
              "is nonzero = cell interior: invert the labels)", file=sys.stderr)
    overlap = {"iou": iou(proposal, truth, threshold=args.threshold),
               "dice": dice(proposal, truth, threshold=args.threshold)}
    by_threshold = {float(th): iou(proposal, truth, threshold=th) for th in WARPING_SWEEP}
    best = max(by_threshold, key=by_threshold.get)
    if args.json:
        table = {name: {"value": details.value, "threshold": details.threshold} for name, details in results.items()}
        table.update({name: {"value": value, "threshold": args.threshold} for name, value in overlap.items()})
        print(json.dumps({**table, "iou_by_threshold": by_threshold}, indent=2))
        return 0
    print(f"{'metric':<18} {'value':>10} {'threshold':>10}  better")
    for name, details in results.items():
        value = details.value
        label, better = METRICS[name]
        print(f"{label:<18} {value:>10.7f} {details.threshold:>10.1f}  {better}")
    for name, value in overlap.items():
        print(f"{'foreground ' + name.upper() if name == 'iou' else 'foreground Dice':<18} {value:>10.7f} "
              f"{args.threshold:>10.2f}  higher")
    print(f"foreground IOU is highest at threshold {best:.1f} ({by_threshold[best]:.4f}); P > T, T = "
          + ", ".join(f"{th:.1f}: {value:.3f}" for th, value in by_threshold.items()))
    return 0
