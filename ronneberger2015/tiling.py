"""Overlap-tile prediction with mirror padding (Fig. 2) and test-time augmentation (Sec. 4).

Fig. 2: "Overlap-tile strategy for seamless segmentation of arbitrary large
images ... Missing input data is extrapolated by mirroring." The image is
mirrored at its edges by the network's border (92 px at depth 4) and cut into
input tiles of side ``tile + 2 * border``; their output tiles of side ``tile``
cover the image exactly. Every tile starts at a multiple of 2**depth, on the
pooling grid of one forward pass over the whole padded image, so the tiled
result equals that pass: seamless to rounding, not just to the eye.

Sec. 4 averages the ISBI prediction "over 7 rotated versions of the input
data"; ``tta=True`` averages over the 8 rotations and flips of each tile.

Command line: ``python -m ronneberger2015 predict IMAGE -o OUT --checkpoint CKPT``.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import numbers
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .commandline import add_threads, renamed, require, set_threads
from .io import image_to_float, load_checkpoint, output_files, read_images, write_image
from .network import UNet, input_size, output_size
from .runtime import BYTES, PRECISIONS, autocast, check_precision, resolve_device
from .segmentation import label_cells, mask

__all__ = ["predict", "load_model", "DEFAULT_MEMORY_BUDGET", "DIHEDRAL"]

DEFAULT_MEMORY_BUDGET = 2 * 2**30
"""Bytes of activations one forward pass may hold when ``tile`` or ``batch_size`` is not given."""

ACTIVATION_MAPS = 6
"""Peak live activations of a forward pass, in feature maps of ``base_channels`` channels at the
input tile's size: the first expansive level holds the skip (1), the up-convolution (1), their
concatenation (2) and a convolution output (1); one more for workspace."""

DIHEDRAL = tuple((turns, flip) for turns in range(4) for flip in (False, True))
"""The 8 symmetries of the square: ``turns`` quarter turns, then a left-right flip or not."""


def _cover(size: int, depth: int) -> int:
    """The smallest valid output side that is at least ``size``."""
    return output_size(input_size(size, depth), depth)


def _output_tile(side, depth: int, border: int) -> int:
    """``side`` if it is a usable output tile side; else a ValueError naming the valid ones near it."""
    period = 2**depth
    if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < period:
        raise ValueError(f"tile sides must be integers >= 2**depth = {period} "
                         f"(tiles start on the pooling grid), got {side!r}")
    try:
        output_size(int(side) + 2 * border, depth)
    except ValueError as error:
        below = next((t for t in range(side - 1, period - 1, -1) if _cover(t, depth) == t), None)
        near = " and ".join(str(t) for t in (below, _cover(side, depth)) if t)
        raise ValueError(f"tile {side} is not a valid output tile of a depth-{depth} U-Net; "
                         f"valid output tiles near {side}: {near} ({error})") from None
    return int(side)


def _largest_tile(depth: int, border: int, pixel_bytes: int, budget: int) -> int:
    """The largest valid square output tile whose forward pass fits ``budget`` bytes."""
    tile = math.isqrt(budget // pixel_bytes) - 2 * border
    while tile >= 2**depth and _cover(tile, depth) != tile:
        tile -= 1
    if tile < 2**depth:
        raise ValueError(f"memory_budget {budget} bytes does not hold one tile's forward pass; "
                         "raise it or give output_tile=")
    return tile


def _spans(size: int, tile: int, period: int) -> tuple[list[tuple[int, int, int]], int]:
    """Tiles along one axis, as (start, first, end): the tile's output begins at ``start`` and it
    writes rows [first, end); and how far the last tile reaches beyond the image.

    Starts are multiples of ``period``: tiles step by the largest multiple of
    it within ``tile``, and the last starts at the first multiple at or after
    ``size - tile``, so it overhangs the image by less than ``period``.
    """
    step = tile - tile % period
    count = 1 if size <= tile else 1 + -(-(size - tile) // step)
    spans = [(i * step, i * step, (i + 1) * step) for i in range(count - 1)]
    last = -(-max(size - tile, 0) // period) * period
    spans.append((last, (count - 1) * step, size))
    return spans, last + tile - size


def _as_stack(image, in_channels: int) -> tuple[np.ndarray, bool]:
    """The image as a (Z, C, H, W) float32 stack in [0, 1], and whether it was a single image."""
    image = np.asarray(image)
    layouts = "(H, W) or (Z, H, W)" if in_channels == 1 else f"({in_channels}, H, W) or (Z, {in_channels}, H, W)"
    if image.ndim == 4:
        stack, single = image, False
    elif image.ndim == 3:
        stack, single = (image[:, None], False) if in_channels == 1 else (image[None], True)
    elif image.ndim == 2:
        stack, single = image[None, None], True
    else:
        raise ValueError(f"expected an image of shape {layouts}, got shape {image.shape}")
    if stack.shape[1] != in_channels:
        raise ValueError(f"the image (shape {image.shape}) has {stack.shape[1]} channel(s) but the model "
                         f"takes {in_channels}; give {layouts}")
    if min(stack.shape[-2:]) < 1:
        raise ValueError(f"the image is empty (shape {image.shape})")
    return image_to_float(stack), single


def _tiles(canvases: Iterable[np.ndarray], rows: list, cols: list, window: tuple[int, int]) -> Iterator[tuple]:
    """(z, row span, column span, input window) for every tile of every mirrored (C, H, W) canvas, slice by slice."""
    for z, canvas in enumerate(canvases):
        for row, col in itertools.product(rows, cols):
            yield z, row, col, canvas[:, row[0] : row[0] + window[0], col[0] : col[0] + window[1]]


def _dihedral(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """``turns`` quarter turns of the last two axes, then a left-right flip if ``flip``."""
    x = torch.rot90(x, turns, dims=(-2, -1))
    return x.flip(-1) if flip else x


def _undo(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    """The inverse of ``_dihedral(x, turns, flip)``."""
    return torch.rot90(x.flip(-1) if flip else x, -turns, dims=(-2, -1))


def _averaged_probabilities(model: nn.Module, tiles: torch.Tensor, transforms: Sequence[tuple[int, bool]],
                   chunk: int, precision: str) -> torch.Tensor:
    """Soft-max probabilities of a batch of input tiles, averaged over ``transforms``.

    The transformed copies of all tiles run together, ``chunk`` per forward
    pass; copies of one shape (a quarter turn swaps a non-square tile's sides)
    share passes. Each output is transformed back before the average.
    """
    groups: dict[torch.Size, list] = {}
    for transform in transforms:
        view = _dihedral(tiles, *transform)
        groups.setdefault(view.shape, []).append((transform, view))
    outputs = []
    for members in groups.values():
        probabilities = []
        for part in torch.cat([view for _, view in members]).split(chunk):
            with autocast(part.device, precision):
                logits = model(part.contiguous(memory_format=torch.channels_last))
            probabilities.append(torch.softmax(logits.float(), dim=1))
        for (transform, _), p in zip(members, torch.cat(probabilities).split(len(tiles))):
            outputs.append(_undo(p, *transform))
    return torch.stack(outputs).mean(dim=0)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _write(result: np.ndarray, probabilities: torch.Tensor, spans: list, done, bar: tqdm) -> None:
    """Copy each tile's own rows and columns of ``probabilities`` into ``result``, once ``done``."""
    if done is not None:
        done.synchronize()
    for p, (z, (top, first_row, end_row), (left, first_col, end_col)) in zip(probabilities.numpy(), spans):
        result[z, :, first_row:end_row, first_col:end_col] = \
            p[:, first_row - top : end_row - top, first_col - left : end_col - left]
    bar.update(len(spans))


def _run_batches(model: nn.Module, batches: Iterable[list], result: np.ndarray, forward, window: tuple[int, int],
         tile: tuple[int, int], per_batch: int, device: torch.device, bar: tqdm) -> None:
    """Run batches of ``_tiles`` items through ``forward``, writing each output tile into ``result``.

    Two host buffers each way, reused (pinned on CUDA, copies asynchronous):
    the next batch is cut and the previous one written while the device works.
    """
    pinned = device.type == "cuda"
    buffers = [(torch.empty((per_batch, model.in_channels, *window), pin_memory=pinned),
                torch.empty((per_batch, model.num_classes, *tile), pin_memory=pinned)) for _ in range(2)]
    pending = None
    for index, batch in enumerate(batches):
        host_in, host_out = (buffer[: len(batch)] for buffer in buffers[index % 2])
        for slot, (*_, window_view) in zip(host_in.numpy(), batch):
            slot[...] = window_view
        host_out.copy_(forward(host_in.to(device, non_blocking=pinned)), non_blocking=pinned)
        done = torch.cuda.Event() if pinned else None
        if done is not None:
            done.record()
        if pending is not None:
            _write(result, *pending, bar)
        pending = (host_out, [item[:3] for item in batch], done)
    if pending is not None:
        _write(result, *pending, bar)


def predict(
    model: UNet,
    image: np.ndarray,
    *,
    output_tile: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    tta: bool = False,
    precision: str = "fp32",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    tile: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Soft-max probabilities of ``model`` for an image or a stack, by overlap-tile (Fig. 2).

    Parameters
    ----------
    model : UNet
        a ``UNet``. It is moved to ``device`` with channels_last
        weights (in place, as ``Module.to``; the faster layout for
        convolutions on CPUs and GPUs, same values) and run in eval mode;
        its training flag is restored.
    image : np.ndarray
        (H, W) or a stack (Z, H, W) for a single-channel model; for
        ``in_channels`` C > 1, (C, H, W) or (Z, C, H, W) (a 4-D array is
        always a stack). uint8, uint16, or float in [0, 1] (no NaN).
    output_tile : int | tuple[int, int] | None
        output tile side, or (height, width): a valid output side
        of the network (388 and 516 at depth 4), at least 2**depth. Default: the
        largest square tile whose forward pass fits ``memory_budget``. A
        side larger than the image shrinks to the smallest valid side that
        covers it (same result, less work).
    batch_size : int | None
        network inputs per forward pass, each TTA copy counting
        as one; tiles of all slices are batched together. Default: 1 on
        the CPU (larger batches run slower there), else as many as fit
        ``memory_budget``.
    device : str | torch.device | None
        where the network runs; default: where the model's weights are.
    tta : bool
        average the soft-max probabilities over the 8 rotations and
        flips of each input tile (``DIHEDRAL``), each output turned back;
        the paper (Sec. 4) averaged "over 7 rotated versions".
    precision : str
        "fp32", or "bf16" (autocast; probabilities are float32).
    memory_budget : int
        bytes of activations one forward pass may hold, as
        estimated with ``ACTIVATION_MAPS``; it bounds the device memory
        whatever the image size (the result itself lives in host memory).
    progress : bool
        show a progress bar over tiles.
    tile : int | tuple[int, int] | None
        the earlier name of ``output_tile`` (a DeprecationWarning says so).

    Returns
    -------
    numpy.ndarray
        float32 (K, H, W) for one image, (Z, K, H, W) for a stack; K =
        ``model.num_classes``. A non-finite output (broken weights) raises
        ``FloatingPointError`` instead.

    Mirroring (numpy ``reflect``: the edge pixel is not repeated) adds
    ``model.border`` pixels on each side; where a side is shorter than that,
    the reflection repeats, so the padding is periodic with period 2(n - 1)
    (a row ``a b c`` continues ``b a b c b a b ...``; a 1-pixel side is
    repeated). The last tile of a row or column may reach up to 2**depth - 1
    pixels further, also mirrored; the image is never padded with zeros. Tiles
    start on the pooling grid (multiples of 2**depth), so the result equals
    one forward pass over the whole mirrored image.
    """
    if tile is not None:
        warnings.warn("predict(tile=) is now predict(output_tile=): the side of the output tile", DeprecationWarning,
                      stacklevel=2)
        output_tile = tile if output_tile is None else output_tile
    stack, single = _as_stack(image, model.in_channels)
    tile = _tile_sides(model, output_tile, stack.shape[-2:], precision, memory_budget)
    border = model.border
    (rows, below), (cols, right) = (_spans(n, t, 2**model.depth) for n, t in zip(stack.shape[-2:], tile))
    pad = ((0, 0), (border, border + below), (border, border + right))
    canvases = (np.pad(image, pad, mode="reflect") for image in stack)
    result = _predict_spans(model, canvases, len(stack), rows, cols, tile, batch_size=batch_size, device=device,
                            tta=tta, precision=precision, memory_budget=memory_budget, progress=progress)
    return _require_finite(result[0] if single else result)


def _tile_sides(model: UNet, tile, size: Sequence[int], precision: str, memory_budget: int) -> tuple[int, int]:
    """The output tile (height, width) ``predict`` uses on an image of ``size``: ``tile``, or the largest
    square whose forward pass fits ``memory_budget``; each side shrunk to the smallest valid one covering the image."""
    check_precision(precision)
    depth, border = model.depth, model.border
    if tile is None:
        tile = _largest_tile(depth, border, ACTIVATION_MAPS * model.base_channels * BYTES[precision], memory_budget)
    sides = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
    if len(sides) != 2:
        raise ValueError(f"tile must be one side or a (height, width) pair, got {tile!r}")
    return tuple(min(_output_tile(s, depth, border), _cover(n, depth)) for s, n in zip(sides, size))


def _predict_spans(model: UNet, canvases: Iterable[np.ndarray], slices: int, rows: list, cols: list,
                   tile: tuple[int, int], *, batch_size: int | None, device, tta: bool, precision: str,
                   memory_budget: int, progress: bool) -> np.ndarray:
    """Probabilities (slices, K, H, W) of the tiles ``rows`` x ``cols`` of mirrored (C, h, w) canvases.

    A span (start, first, end) of ``_spans`` reads canvas rows (or columns)
    [start, start + tile + 2 * border) and writes result rows [first, end); H
    and W are the last spans' ends. ``predict`` passes each slice mirrored
    whole; ``volume.predict_volume`` one block of slices with its border.
    """
    window = tuple(t + 2 * model.border for t in tile)
    weights = next(model.parameters(), None)
    device = torch.device(device if device is not None else weights.device if weights is not None else "cpu")
    pixel_bytes = ACTIVATION_MAPS * model.base_channels * BYTES[precision]
    if batch_size is None:  # one tile keeps a CPU busy; larger CPU batches measured slower
        batch_size = 1 if device.type == "cpu" else max(1, memory_budget // (pixel_bytes * window[0] * window[1]))
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    transforms = DIHEDRAL if tta else DIHEDRAL[:1]
    count = slices * len(rows) * len(cols)
    per_batch = min(max(1, batch_size // len(transforms)), max(count, 1))

    model.to(device, memory_format=torch.channels_last)
    result = np.empty((slices, model.num_classes, rows[-1][2], cols[-1][2]), dtype=np.float32)
    batches = _batched(_tiles(canvases, rows, cols, window), per_batch)
    forward = functools.partial(_averaged_probabilities, model, transforms=transforms, chunk=batch_size,
                                precision=precision)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=count, unit="tile", desc="predict", disable=not progress) as bar:
            _run_batches(model, batches, result, forward, window, tile, per_batch, device, bar)
    finally:
        model.train(training)
    return result


def _require_finite(probabilities: np.ndarray) -> np.ndarray:
    """``probabilities``, or ``FloatingPointError`` where the network's output is not finite (broken weights)."""
    if not np.isfinite(probabilities).all():
        raise FloatingPointError("the network's output is not finite at "
                                 f"{np.count_nonzero(~np.isfinite(probabilities))} "
                                 "of its values: its weights are broken (e.g. by a diverged training run)")
    return probabilities


def load_model(checkpoint, device: str | torch.device | None = None) -> UNet:
    """The ``UNet`` a checkpoint describes, with its weights, in eval mode on ``device`` (default CPU).

    A checkpoint is a dict saved by ``torch.save`` with ``"model"`` (the
    state_dict) and ``"config"``, whose ``"network"`` entry holds the ``UNet``
    keyword arguments (missing ones take their defaults). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for one that
    is not such a checkpoint.
    """
    state = load_checkpoint(checkpoint)
    network = state["config"].get("network") if isinstance(state["config"], dict) else None
    if not isinstance(network, dict):
        raise ValueError(f"checkpoint {checkpoint} has no config['network'] (the UNet's keyword arguments)")
    try:
        model = UNet(**network)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint {checkpoint}: its weights do not fit UNet(**{network}) ({error})") from error
    return model.to(device or "cpu").eval()


def add_prediction_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``predict`` command's options for images and for Zarr volumes alike; ``what`` names the input."""
    parser.add_argument("input", type=Path, help=what)
    parser.add_argument("-o", "--output", type=Path, help="output file for a file, output folder for a folder "
                        "(one file per image, the same names; probabilities as NAME.tif), Zarr folder for a Zarr input")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt or best.pt of a training run")
    parser.add_argument("--tta", action="store_true", help="average over the 8 rotations and flips (Sec. 4)")
    parser.add_argument("--output-tile", type=int, metavar="SIDE",
                        help="output tile side, e.g. 388 (default: the largest that fits memory)")
    renamed(parser, "--tile", "--output-tile", dest="output_tile", type=int)
    parser.add_argument("--batch-size", type=int,
                        help="network inputs per forward pass (default: 1 on CPU, else what fits memory)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast (default: fp32)")


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m ronneberger2015 predict INPUT -o OUTPUT --checkpoint CKPT``; a Zarr input or output goes to
    ``volume.cli`` instead (``__main__`` chooses)."""
    parser = argparse.ArgumentParser(prog=prog, description="Overlap-tile prediction (Fig. 2): cell-interior "
                                     "probabilities as float32 TIFF (the ISBI 2012 format), or with --threshold a "
                                     "mask, or with --instances one id per cell; a Zarr volume of any size with "
                                     "the [volume] extra (docs/prediction.md).")
    add_prediction_options(parser, "an image or TIFF stack (TIFF, PNG, GIF), a folder of images, or a Zarr array "
                           "(Y, X) or (Z, Y, X) or OME-Zarr image")
    add_threads(parser)
    written = parser.add_mutually_exclusive_group()
    written.add_argument("--membrane", action="store_true",
                         help="write the membrane probability (class 0) instead of the cell interior (class 1)")
    written.add_argument("--threshold", type=float, metavar="T",
                         help="write a mask, 255 where P(cell) > T (choose T on validation data: docs/prediction.md)")
    parser.add_argument("--instances", action="store_true", help="write one id per cell (uint16): the 4-connected "
                        "components of P(cell) > T (T = --threshold, default 0.5)")
    parser.add_argument("--min-size", type=int, default=0, metavar="PIXELS",
                        help="with --instances: drop cells smaller than this (default 0)")
    args = parser.parse_args(argv)
    require(parser, args, "output", "-o/--output")
    if args.instances and args.membrane:
        parser.error("--instances labels cells; it cannot go with --membrane")
    set_threads(args.threads)
    images, sources = read_images(args.input)  # every input and output is checked before the network runs
    targets = output_files(args.input, sources, args.output, floats=args.threshold is None and not args.instances)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    if model.num_classes < 2:
        raise ValueError(f"the model has {model.num_classes} class(es); cell and membrane need 2")
    tile = args.output_tile
    if tile is not None and _is_input_side(tile, model.depth) and _cover(tile, model.depth) != tile:
        print(f"note: {tile} is an input tile side; taking --output-tile {tile - 2 * model.border}", file=sys.stderr)
        tile -= 2 * model.border
    probabilities = predict(model, images, output_tile=tile, batch_size=args.batch_size, device=device,
                            tta=args.tta, precision=args.precision, progress=True)[:, 0 if args.membrane else 1]
    threshold = 0.5 if args.threshold is None else args.threshold
    if args.instances:
        result, what = label_cells(probabilities, threshold, min_size=args.min_size), f"cells (P > {threshold:g})"
    elif args.threshold is not None:
        result, what = mask(probabilities, threshold), f"masks (255: P > {threshold:g})"
    else:
        result, what = probabilities, ("membrane" if args.membrane else "cell-interior") + " probabilities"
    pages = list(result) if args.input.is_dir() else [result if len(result) > 1 else result[0]]
    for target, page in zip(targets, pages):
        write_image(target, page)
    where = targets[0] if len(targets) == 1 else f"{len(targets)} files in {args.output}"
    print(f"wrote {what} of {len(images)} image(s) of {images.shape[1]}x{images.shape[2]}: {where}")
    return 0


def _is_input_side(side: int, depth: int) -> bool:
    try:
        output_size(side, depth)
    except ValueError:
        return False
    return True
