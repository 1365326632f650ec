"""Validation during training: scores on held-out images every N iterations, and the checks at the end.

The paper trains for a fixed schedule and keeps the final network (Sec. 3);
it reports scores only on the challenge's test data (Sec. 4). A user training
on new data needs to see whether and when the network learns, so ``train``
can predict held-out images every ``validate_every`` iterations (overlap-tile,
Fig. 2), score them here, log the scores beside the loss (the learning
curve), and keep the weights with the best score as ``best.pt``. Validation
reads no random numbers and leaves the network as it found it, so a run with
validation reaches the same weights as one without.

At the end of a run, ``diagnose`` names the two failures that otherwise go
unnoticed: a loss that has not fallen, and an output that is (nearly) the
same everywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import metrics
from .segmentation import label_cells
from .tiling import predict

__all__ = ["SCORES", "Validation", "validation_set", "validate", "improves", "diagnose"]

SCORES = {
    "vrand": "higher",
    "vinfo": "higher",
    "rand_error": "lower",
    "pixel_error": "lower",
    "warping_error": "lower",
    "iou": "higher",
    "dice": "higher",
    "seg": "higher",
}
"""The validation scores, each with the direction that is better; any of them can choose ``best.pt``
("seg", the cell tracking challenge's SEG, only with instance labels)."""

NEAR_CONSTANT = 0.05
"""A cell probability whose standard deviation over the images is below this is called near-constant
(a network that has learned the ISBI membranes: about 0.4; one that predicts a class frequency: < 0.01)."""

LOSS_FALL = 0.9
"""The loss has "not fallen" when its mean over the last tenth of the run is above this fraction of the first
tenth's."""


class Validation(NamedTuple):
    """Held-out images (Z, H, W), their binary cell-interior truth (the separated training target) and, for
    instance labels, their cell ids (the truth of SEG; None for binary labels)."""

    images: np.ndarray
    truth: np.ndarray
    cells: np.ndarray | None = None


def validation_set(images: np.ndarray, target: np.ndarray, cells: np.ndarray | None = None) -> Validation:
    """Checked validation data: one truth slice per image, each with cell interior and background.

    ``target`` is the binary training target of the validation labels (cells
    separated as for training); ``cells`` the labels themselves where they are
    instance ids, scored with SEG. The ISBI scores are undefined on a slice
    without cells, so such a slice is refused before any training starts.
    """
    images, target = np.asarray(images), np.asarray(target)
    if images.ndim == 2:
        images, target = images[None], target[None]
        cells = None if cells is None else np.asarray(cells)[None]
    if images.ndim != 3 or images.shape != target.shape:
        raise ValueError(f"validation images and labels must be (H, W) or (Z, H, W) of one shape, "
                         f"got {images.shape} and {target.shape}")
    truth = target > 0
    empty = [z for z, mask in enumerate(truth) if not mask.any()]
    if empty:
        raise ValueError(f"validation slice(s) {empty} have no cell: their scores are undefined; "
                         "leave them out of the validation data")
    if cells is not None:
        metrics.seg(cells, cells)  # the checks of SEG's truth, before any training
    return Validation(images, truth, cells)


def validate(model: torch.nn.Module, validation: Validation, *, device: torch.device,
             precision: str = "fp32", threshold: float = 0.5) -> dict[str, float]:
    """The ``SCORES`` of ``model`` on ``validation``, and ``output_std``, the spread of its cell probability.

    Prediction is overlap-tile with mirroring (Fig. 2), without test-time
    augmentation; the five ISBI 2012 metrics come from ``metrics.evaluate``,
    foreground IOU and Dice from ``metrics.iou`` and ``metrics.dice`` at
    ``threshold``; with cell ids, SEG (``metrics.seg``) of the cells
    ``label_cells`` finds at ``threshold``. Like ``predict``, it leaves the
    weights channels_last.
    """
    probabilities = predict(model, validation.images, device=device, precision=precision)[:, 1]
    scores = metrics.evaluate(probabilities, validation.truth)
    scores["iou"] = metrics.iou(probabilities, validation.truth, threshold=threshold)
    scores["dice"] = metrics.dice(probabilities, validation.truth, threshold=threshold)
    if validation.cells is not None:
        scores["seg"] = metrics.seg(label_cells(probabilities, threshold), validation.cells)
    scores["output_std"] = float(probabilities.std())
    return scores


def improves(score: float, best: float | None, name: str) -> bool:
    """Whether ``score`` of validation score ``name`` beats ``best`` (None: nothing yet)."""
    if best is None:
        return True
    return score > best if SCORES[name] == "higher" else score < best


def diagnose(losses: list[float], output_std: float | None) -> list[str]:
    """Warnings for a run that did not learn: the loss has not fallen, or the output is near-constant.

    ``losses`` are the logged per-iteration losses in order (the check needs
    at least 100); ``output_std`` is the standard deviation of the cell
    probability over the validation (or training) images at the end.
    """
    warnings = []
    if len(losses) >= 100:
        tenth = len(losses) // 10
        first, last = float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:]))
        if last > LOSS_FALL * first:
            warnings.append(
                f"the loss has not fallen: {first:.4f} over the first tenth of the run, {last:.4f} over the last; "
                "try a lower learning rate (or a higher one if it stayed flat from the start), "
                "and check that images and labels match")
    if output_std is not None and output_std < NEAR_CONSTANT:
        warnings.append(
            f"the output is near-constant (standard deviation of the cell probability {output_std:.4f} "
            f"< {NEAR_CONSTANT}): the network predicts about the same everywhere; train longer, lower the "
            "learning rate, or check the image contrast and the labels")
    return warnings
