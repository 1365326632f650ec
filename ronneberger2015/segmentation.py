"""From probabilities to a segmentation: a threshold, and cells as connected components.

The paper scores the EM probability maps directly ("without any further pre-
or postprocessing", Sec. 4); the cell tracking challenge (Table 2) and most
users need a mask or one id per cell. The step is kept minimal, and each
choice the paper leaves open is an argument here:

- ``threshold``: a pixel is cell where P(cell) > threshold (strict, as the
  ISBI metrics binarise). 0.5 is the soft-max's decision, but a network
  trained with class balancing (w_c of Eq. 2) over-predicts the rarer class
  there; choose it on validation data (``evaluate`` prints the IOU at each
  threshold).
- cells are the 4-connected components of the mask, as everywhere in this
  package (the weight map's cells, the ISBI metrics' objects);
- ``min_size``: components smaller than this many pixels are dropped
  (default 0: none); holes are not filled.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["mask", "label_cells"]

FOUR = ndimage.generate_binary_structure(2, 1)


def mask(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``probabilities > threshold`` as uint8 0/255 (255 = cell), the form of the ISBI labels."""
    probabilities = np.asarray(probabilities)
    _check(probabilities, threshold)
    return np.where(probabilities > threshold, np.uint8(255), np.uint8(0))


def label_cells(probabilities: np.ndarray, threshold: float = 0.5, *, min_size: int = 0) -> np.ndarray:
    """One id per cell: the 4-connected components of ``probabilities > threshold``, numbered 1, 2, ...

    (H, W) or (Z, H, W), each slice on its own; components smaller than
    ``min_size`` pixels become background (0). Returns uint16 (the cell
    tracking challenge's result format), or uint32 where a slice has more than
    65535 cells.
    """
    probabilities = np.asarray(probabilities)
    _check(probabilities, threshold)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a whole number of pixels >= 0, got {min_size!r}")
    slices = probabilities[None] if probabilities.ndim == 2 else probabilities
    labels = np.zeros(slices.shape, np.uint32)
    for z, probability in enumerate(slices):
        cells, count = ndimage.label(probability > threshold, FOUR)
        if min_size > 1 and count:
            sizes = np.bincount(cells.ravel())
            keep = sizes >= min_size
            keep[0] = False
            renumber = np.zeros(count + 1, np.uint32)
            renumber[keep] = np.arange(1, keep.sum() + 1)
            cells = renumber[cells]
        labels[z] = cells
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    return labels.astype(dtype)[0] if probabilities.ndim == 2 else labels.astype(dtype)


def _check(probabilities: np.ndarray, threshold: float) -> None:
    if probabilities.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) image or a (Z, H, W) stack of probabilities, got {probabilities.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
