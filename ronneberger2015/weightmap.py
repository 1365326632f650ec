"""The boundary weight map of Eq. 2 (paper Sec. 3), and the ``weightmap`` command.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)),   w0 = 10, sigma = 5 px

"We pre-compute the weight map for each ground truth segmentation to
compensate the different frequency of pixels from a certain class in the
training data set, and to force the network to learn the small separation
borders that we introduce between touching cells." The paper leaves the
following open; each is a choice, listed in docs/fidelity.md:

- Cells: in a binary mask (bool, or one nonzero value such as {0, 255} or
  {0, 1}) the 4-connected components of the foreground; in an instance image
  (0 = background, other values = cell ids) the ids. ``instances`` forces one
  reading. A stack (Z, H, W) is read as a whole, then mapped slice by slice.
- Separation border: where two ids touch, a 1-pixel background border is cut
  first (``separate_instances``); the training target is the separated mask.
- d1, d2: Euclidean distance from a pixel to the nearest pixel of the nearest
  and of the second nearest cell. With fewer than two cells there is no border
  term.
- The border term applies to background pixels only (cell pixels get w_c), as
  in the authors' later plugin (Falk et al. 2019), whose defaults are w0 = 50,
  sigma = 6; the defaults here are 2015's.
- w_c = N / (K N_class) per slice: N pixels, N_class of them in the pixel's
  class, K the number of classes present (2, or 1 for a mask with no cells or
  no background), so w_c has mean 1. ``class_balance=False`` gives w_c = 1.

Each cell's distance transform is computed only within ``_reach`` of its
bounding box, never over the whole image; the map differs from the definition
(one full-image transform per cell) by less than float32 resolution, 1e-6.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from .io import output_files, read_images, save_figure, write_tiff

__all__ = ["weight_map", "target_and_weights", "separate_instances", "label_reading", "LabelReading"]

W0 = 10.0
SIGMA = 5.0
# float32 resolution (numpy's finfo(float32).resolution, 1e-6: 6 significant
# digits at the mean weight 1). The border term is dropped where it is smaller,
# so the map differs from the definition of Eq. 2 by less than this.
RESOLUTION = float(np.finfo(np.float32).resolution)
_FAR = np.iinfo(np.int32).max  # squared distance to a cell out of reach


def separate_instances(instances: np.ndarray) -> np.ndarray:
    """Cut a 1-pixel background border between touching cells (Sec. 3).

    "The separation border is computed using morphological operations": where
    two 4-neighbours carry different nonzero ids, the pixel with the larger id
    becomes background (0). The rule does not depend on the image's
    orientation, so it commutes with the flips and rotations of augmentation;
    a cell only 1 pixel wide along a lower-id neighbour can vanish. Returns a
    copy of the (H, W) or (Z, H, W) array (slices separately), ids unchanged.
    """
    instances = np.asarray(instances)
    _check_shape(instances)
    cut = np.zeros(instances.shape, dtype=bool)
    for low, high in ((np.s_[..., :-1, :], np.s_[..., 1:, :]), (np.s_[..., :-1], np.s_[..., 1:])):
        a, b = instances[low], instances[high]
        cut[low] |= (b != 0) & (a > b)
        cut[high] |= (a != 0) & (b > a)
    separated = instances.copy()
    separated[cut] = 0
    return separated


def target_and_weights(
    labels: np.ndarray,
    *,
    w0: float = W0,
    sigma: float = SIGMA,
    instances: bool | None = None,
    class_balance: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The training target and its weight map w(x) (Sec. 3, Eq. 2).

    ``labels``: (H, W) or (Z, H, W), a binary mask or an instance image (see
    the module docstring; ``instances=True``/``False`` forces the reading).
    Returns ``(target, weights)`` of the same shape: ``target`` int64, 1 for
    cell and 0 for background once the separation border is cut; ``weights``
    float32, w_c plus the border term on background pixels. ``progress``
    shows a bar over the slices of a stack.

    A slice without cells, or without background, has no border term and
    w_c = 1, so its map is all ones. Raises ValueError for a shape other than
    2D/3D, an empty array, float labels that are not whole numbers, negative
    labels, ``sigma <= 0`` or ``w0 < 0``.
    """
    background, weights = _maps(labels, w0, sigma, instances, class_balance, progress)
    return (~background).astype(np.int64), weights


def weight_map(
    labels: np.ndarray,
    *,
    w0: float = W0,
    sigma: float = SIGMA,
    instances: bool | None = None,
    class_balance: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)) (Sec. 3, Eq. 2), float32.

    Same arguments, choices and errors as ``target_and_weights``; returns only
    its weight map.
    """
    return _maps(labels, w0, sigma, instances, class_balance, progress)[1]


def _maps(
    labels: np.ndarray, w0: float, sigma: float, instances: bool | None, class_balance: bool, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Background mask (bool) and weights (float32) of every slice."""
    labels, binary = _as_labels(labels, instances)
    _check_parameters(w0, sigma)
    background = np.empty(labels.shape, dtype=bool)
    weights = np.empty(labels.shape, dtype=np.float32)
    slices = list(np.ndindex(labels.shape[:-2]))  # [()] for one image
    for z in tqdm(slices, desc="weight map", unit="slice", disable=not progress or len(slices) == 1):
        cells, n = _cells(labels[z], binary)
        background[z] = cells == 0
        weights[z] = _class_weights(background[z]) if class_balance else 1.0
        if n >= 2 and w0 > RESOLUTION:
            within, term = _border_term(cells, w0, sigma)
            with np.errstate(over="ignore"):  # an overflow is refused below, with the fix
                weights[z][within] += term
    if not np.isfinite(weights).all():
        raise ValueError(f"the weight map overflows float32 with w0 = {w0:g}; use a w0 below 1e37")
    return background, weights


class LabelReading(NamedTuple):
    """How label images are read: as a binary mask or as cell ids, and the cells in each slice."""

    instances: bool
    cells: tuple[int, ...]

    @property
    def empty(self) -> list[int]:
        """The slices without any cell."""
        return [z for z, n in enumerate(self.cells) if n == 0]

    def __str__(self) -> str:
        kind = ("instance ids (touching cells get a 1-px border; --binary reads them as a mask)" if self.instances
                else "a binary mask (nonzero = cell; cells are its 4-connected components)")
        slices = f" in {len(self.cells)} slices" if len(self.cells) > 1 else ""
        return f"labels read as {kind}: {sum(self.cells)} cells{slices}"


def label_reading(labels: np.ndarray, instances: bool | None = None) -> LabelReading:
    """How ``labels`` are read (see the module docstring) and how many cells each slice holds."""
    labels, binary = _as_labels(labels, instances)
    slices = labels[None] if labels.ndim == 2 else labels
    if binary:
        cells = tuple(ndimage.label(s != 0)[1] for s in slices)
    else:
        cells = tuple(int(np.count_nonzero(np.unique(s))) for s in slices)
    return LabelReading(not binary, cells)


def _check_parameters(w0: float, sigma: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma}")
    if not (math.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0 must be a number >= 0, got {w0}")


def _check_shape(array: np.ndarray) -> None:
    if array.ndim not in (2, 3):
        raise ValueError(f"labels must be an image (H, W) or a stack (Z, H, W), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"labels are empty (shape {array.shape})")


def _as_labels(labels: np.ndarray, instances: bool | None) -> tuple[np.ndarray, bool]:
    """Checked non-negative integer labels, and whether they are read as a binary mask."""
    labels = np.asarray(labels)
    _check_shape(labels)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or (labels != np.floor(labels)).any():
            raise ValueError("float labels must be whole numbers (a 0/1 mask or cell ids); threshold or round them")
        labels = labels.astype(np.int64)
    elif labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer, bool or whole-number float, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0: 0 for background, positive values for cells")
    if instances is not None:
        return labels, not instances
    top = labels.max()
    return labels, bool(((labels == 0) | (labels == top)).all())


def _cells(labels: np.ndarray, binary: bool) -> tuple[np.ndarray, int]:
    """Cells of one slice numbered 1..n (0 = background), and n."""
    if binary:
        return ndimage.label(labels != 0)  # default structure: the 4-neighbourhood
    ids, cells = np.unique(separate_instances(labels), return_inverse=True)
    cells = cells.reshape(labels.shape)
    if ids[0] != 0:  # no background pixel: ids start at 1
        cells += 1
    return cells, int(np.count_nonzero(ids))


def _class_weights(background: np.ndarray) -> np.ndarray:
    """w_c = N / (K N_class): each of the K classes present gets total weight N / K, so the mean is 1."""
    n_background = np.count_nonzero(background)
    n_cell = background.size - n_background
    classes = int(n_background > 0) + int(n_cell > 0)
    total = background.size / classes
    return np.where(background, np.float32(total / max(n_background, 1)), np.float32(total / max(n_cell, 1)))


def _reach(w0: float, sigma: float) -> int:
    """How far (px) beyond a cell's bounding box its distance transform is needed.

    The border term is below ``RESOLUTION`` once d1 + d2 >= T, where
    w0 exp(-T^2 / 2 sigma^2) = RESOLUTION: T = sigma sqrt(2 ln(w0 / RESOLUTION)),
    28.4 px for w0 = 10, sigma = 5. A pixel outside a cell's box grown by
    ``reach`` is at least reach + 1 from that cell, and at least 1 from every
    cell (it is background where the term counts), so if that cell is its d1
    or d2, then d1 + d2 >= reach + 2 >= T.
    """
    return max(math.ceil(sigma * math.sqrt(2 * math.log(w0 / RESOLUTION))) - 2, 0)


def _border_term(cells: np.ndarray, w0: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """w0 exp(-(d1 + d2)^2 / 2 sigma^2) of one slice: where it counts (a mask) and its values there.

    It counts on background pixels with two cells in reach; elsewhere it is 0
    or below ``RESOLUTION``.

    Each cell's distance transform is taken inside its bounding box grown by
    ``_reach``, and running arrays keep the two smallest squared distances
    (d1^2 <= d2^2) seen so far at every pixel.
    """
    reach = _reach(w0, sigma)
    d1_sq = np.full(cells.shape, _FAR, dtype=np.int32)
    d2_sq = np.full(cells.shape, _FAR, dtype=np.int32)
    for i, box in enumerate(ndimage.find_objects(cells), start=1):
        grown = tuple(slice(max(axis.start - reach, 0), axis.stop + reach) for axis in box)
        d_sq = _squared_distance(cells[grown] != i)
        nearest, second = d1_sq[grown], d2_sq[grown]
        np.minimum(second, np.maximum(nearest, d_sq), out=second)
        np.minimum(nearest, d_sq, out=nearest)
    within = (d2_sq < _FAR) & (cells == 0)
    d1_plus_d2 = np.sqrt(d1_sq[within]) + np.sqrt(d2_sq[within])
    return within, w0 * np.exp(-(d1_plus_d2**2) / (2 * sigma**2))


def _squared_distance(outside: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance (int32) from each pixel to the nearest False pixel."""
    nearest = ndimage.distance_transform_edt(outside, return_distances=False, return_indices=True)
    nearest[0] -= np.arange(outside.shape[0], dtype=np.int32)[:, None]
    nearest[1] -= np.arange(outside.shape[1], dtype=np.int32)
    nearest *= nearest
    return nearest[0] + nearest[1]


# COMMAND LINE


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m ronneberger2015 weightmap LABELS -o OUT``: weight maps of new labels as float32 TIFF."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Boundary weight map w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / 2 sigma^2) of a label image, stack "
        "or folder (paper Sec. 3, Eq. 2), written as a float32 TIFF, one page per slice (one file per image for a "
        "folder).",
    )
    add = parser.add_argument
    add("labels", type=Path, metavar="LABELS", help="label image: TIFF (2D or a stack), PNG or GIF, or a folder of "
        "them; 0 = background")
    add("-o", "--output", type=Path, required=True, metavar="OUT", help="weight map, float32 TIFF (.tif/.tiff); a "
        "folder for a folder of labels")
    add("--w0", type=float, default=W0, help=f"border weight w0 (default {W0:g}, the paper's; 0: no border term)")
    add("--sigma", type=float, default=SIGMA, help=f"border width sigma in px (default {SIGMA:g})")
    reading = parser.add_mutually_exclusive_group()
    reading.add_argument("--instances", action="store_const", const=True, dest="instances",
                         help="read the labels as cell ids even if they hold one nonzero value")
    reading.add_argument("--binary", action="store_const", const=False, dest="instances",
                         help="read the labels as a mask (nonzero = cell) even if they hold several values")
    add("--no-class-balance", dest="class_balance", action="store_false",
        help="w_c = 1 instead of N / (K N_class), K the classes present")
    add("--preview", type=Path, metavar="PNG", help="also save a PNG: image | mask | weight map with colour bar")
    add("--image", type=Path, help="the raw image or stack for the preview's first panel")
    add("--preview-slice", type=int, default=0, metavar="Z", help="stack slice shown in the preview (default 0)")
    args = parser.parse_args(argv)
    if args.image and not args.preview:
        parser.error("--image is shown in the preview: give --preview PNG too")
    _check_parameters(args.w0, args.sigma)
    if args.preview and args.preview.suffix.lower() != ".png":
        raise ValueError(f"{args.preview}: the preview is a PNG; name it .png")
    labels, files = read_images(args.labels)
    targets = output_files(args.labels, files, args.output, floats=True)
    if args.preview:
        output_files(args.labels, files, args.preview.with_suffix(".tif"), floats=True)  # not over an input either
    image = read_images(args.image)[0] if args.image else None
    if image is not None and image.shape != labels.shape:
        raise ValueError(f"{args.image}: shape {image.shape} differs from the labels' {labels.shape}")
    if not 0 <= args.preview_slice < len(labels):
        raise ValueError(f"--preview-slice {args.preview_slice} is outside the {len(labels)} slice(s)")
    reading = label_reading(labels, args.instances)
    print(reading)
    if reading.empty:
        print(f"warning: slice(s) {reading.empty} have no cell: their weight map is w_c alone", file=sys.stderr)
    target, weights = target_and_weights(
        labels, w0=args.w0, sigma=args.sigma, instances=args.instances, class_balance=args.class_balance, progress=True
    )
    pages = list(weights) if args.labels.is_dir() else [weights if len(weights) > 1 else weights[0]]
    for path, page in zip(targets, pages):
        write_tiff(path, page)
    where = targets[0] if len(targets) == 1 else f"{len(targets)} files in {args.output}"
    print(f"wrote {where}: {len(labels)} slice(s), weights {weights.min():.4g} to {weights.max():.4g}")
    if args.preview:
        z = args.preview_slice
        shown = None if image is None else image[z]
        title = args.labels.name + (f", slice {z}" if len(labels) > 1 else "")
        title += f": w0 = {args.w0:g}, sigma = {args.sigma:g} px"
        save_figure(_preview(shown, target[z], weights[z], title), args.preview, dpi=100)
        print(f"wrote {args.preview}")
    return 0


def _preview(image: np.ndarray | None, target: np.ndarray, weights: np.ndarray, title: str):
    """Figure: image (if given) | separated mask | weight map with a colour bar (cf. the paper's Fig. 3)."""
    from matplotlib.figure import Figure

    panels = ([("image", image)] if image is not None else []) + [("mask (1 = cell)", target)]
    figure = Figure(figsize=(4.2 * (len(panels) + 1) + 0.6, 4.6), layout="constrained")
    axes = figure.subplots(1, len(panels) + 1)
    for ax, (name, array) in zip(axes, panels):
        ax.imshow(array, cmap="gray", interpolation="nearest")
        ax.set_title(name)
    shown = axes[-1].imshow(weights, cmap="jet", interpolation="nearest")
    axes[-1].set_title("weight map w(x)")
    figure.colorbar(shown, ax=axes[-1], shrink=0.85)
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(title)
    return figure
