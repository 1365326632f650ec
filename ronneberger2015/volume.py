"""Overlap-tile prediction (Fig. 2) of volumes larger than memory: a Zarr array in, a Zarr array out.

Fig. 2's strategy is a map over blocks with a border: an output block needs
its input block plus the network's border (92 px at depth 4) read from the
neighbouring blocks, mirrored (numpy ``reflect``) only at the true image
border, never at a block's. Each block is made of whole tiles of the grid that
``predict`` lays over the whole image, each read with its border, so the
result equals ``predict`` on the array in memory; with TTA too, where it
matters where tiles start (a flipped tile meets the pooling grid from its far
edge).

The blocks are a ``dask.array`` computed on the ``distributed`` scheduler: a
``LocalCluster`` by default, or an existing cluster. Each worker loads the
model once. A block writes its output chunks, then a marker file; a run
started again skips the marked blocks. Needs the ``volume`` extra
(``pip install 'ronneberger2015[volume]'``).

Command line: ``python -m ronneberger2015 predict IN.zarr -o OUT.zarr --checkpoint CKPT``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .commandline import require
from .io import image_to_float
from .network import UNet
from .runtime import resolve_device
from .tiling import (
    DEFAULT_MEMORY_BUDGET,
    _predict_spans,
    _require_finite,
    _spans,
    _tile_sides,
    add_prediction_options,
    load_model,
)

__all__ = ["predict_volume", "local_cluster", "is_zarr", "names_zarr", "DTYPES"]

EXTRA = "pip install 'ronneberger2015[volume]'"
DTYPES = ("float32", "uint8")
"""Output types: the probability as float32, or times 255, rounded, as uint8."""
METADATA = ("zarr.json", ".zarray", ".zgroup")
"""Files that make a folder a Zarr array or group (Zarr format 3; format 2)."""
RECORD = "ronneberger2015"
"""The output array's attribute: the settings the prediction began with, and whether it is complete."""
DONE = ".blocks_done"
"""Folder in the output array with one marker file per finished block, while the prediction is incomplete."""

_FORWARD = threading.Lock()  # a worker's threads share its model: one prediction at a time


def _require():
    """The modules of the ``volume`` extra (zarr, dask.array, distributed), or an ImportError naming it."""
    try:
        import dask.array
        import distributed
        import zarr
    except ImportError as error:
        raise ImportError(f"Zarr volumes need the 'volume' extra: {EXTRA} ({error})") from None
    return zarr, dask.array, distributed


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a Zarr store: it ends in .zarr, or is a folder with Zarr metadata."""
    path = Path(path)
    return path.suffix == ".zarr" or any((path / name).is_file() for name in METADATA)


def _fingerprint(model: UNet) -> str:
    """SHA-256 of the network's variant and weights: an output is only resumed with the model that began it."""
    digest = hashlib.sha256(str(getattr(model, "variant", None)).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def _marker(block_id) -> str:
    """A finished block's marker file name: its indices along slices, rows and columns, e.g. ``0.3.1``."""
    return ".".join(map(str, block_id))


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """numpy's ``reflect`` padding as an index map: the image row that position ``index`` of a mirrored
    axis of ``size`` rows shows (period 2 (size - 1); a 1-row axis repeats its row)."""
    if size == 1:
        return np.zeros_like(index)
    index = np.mod(index, 2 * (size - 1))
    return np.where(index < size, index, 2 * (size - 1) - index)


def _block_axis(spans: list, index: int, per_block: int, size: int, tile: int, border: int):
    """Along one axis, block ``index`` of ``per_block`` consecutive tiles of ``predict``'s ``spans``:
    its tiles relative to its first tile's start, the image rows of its mirrored canvas, where its own
    rows begin in its result, and the output rows it writes."""
    own = spans[index * per_block : (index + 1) * per_block]
    origin = own[0][0]  # tiles start in increasing order
    relative = [(start - origin, first - origin, end - origin) for start, first, end in own]
    rows = _reflect(np.arange(origin - border, own[-1][0] + tile + border), size)
    return relative, rows, own[0][1] - origin, slice(own[0][1], own[-1][2])


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker needs to predict any block; small, sent with each task."""

    source: str  # the input array's path
    target: str  # the output array's path
    checkpoint: str | None  # loaded once per worker; None when the model itself is sent
    fingerprint: str
    spans: tuple  # predict's (rows, columns) spans over the whole image
    tile: tuple
    per_block: tuple  # (slices, tile rows, tile columns) per block
    border: int
    class_index: int
    dtype: str
    tta: bool
    precision: str
    batch_size: int | None
    memory_budget: int
    device: str | None


def _worker_device(requested: str | None) -> torch.device:
    """``requested``, else CUDA when the worker has it (the i-th worker of a LocalCluster takes GPU i
    modulo their count), else the CPU."""
    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None:
        name = _require()[2].get_worker().name
        if isinstance(name, int):
            device = torch.device("cuda", name % torch.cuda.device_count())
    return device


@functools.lru_cache(maxsize=2)
def _worker_model(checkpoint: str, fingerprint: str, device: str) -> UNet:
    """The checkpoint's model, loaded once per worker process and device."""
    model = load_model(checkpoint, device)
    if _fingerprint(model) != fingerprint:
        raise ValueError(f"checkpoint {checkpoint} as this worker reads it holds other weights than when the "
                         "prediction began; give each worker the same file and start again")
    return model


def _predict_block(block_id: tuple[int, int, int], *, job: _Job, model: UNet | None = None) -> np.ndarray:
    """Predict output block ``block_id`` (its index along slices, rows and columns), write it slice by
    slice, then mark it done. Returns a (1, 1, 1) True: the block grid is the dask array computed."""
    zarr = _require()[0]
    device = _worker_device(job.device)
    if model is None:
        model = _worker_model(job.checkpoint, job.fingerprint, str(device))
    source, target = zarr.open_array(job.source, mode="r"), zarr.open_array(job.target, mode="r+")
    size = source.shape[-2:]
    (rows, read_rows, top, out_rows), (cols, read_cols, left, out_cols) = (
        _block_axis(spans, i, per_block, n, t, job.border)
        for spans, i, per_block, n, t in zip(job.spans, block_id[1:], job.per_block[1:], size, job.tile))
    first = block_id[0] * job.per_block[0]
    slices = range(first, min(first + job.per_block[0], source.shape[0])) if source.ndim == 3 else range(1)
    lead = (slice(slices.start, slices.stop),) if source.ndim == 3 else ()
    low_row, low_col = read_rows.min(), read_cols.min()
    raw = source[lead + (slice(low_row, read_rows.max() + 1), slice(low_col, read_cols.max() + 1))]
    for z, image in zip(slices, raw.reshape(-1, *raw.shape[-2:])):
        canvas = image[np.ix_(read_rows - low_row, read_cols - low_col)]
        with _FORWARD:
            probabilities = _predict_spans(
                model, [image_to_float(canvas)[None]], 1, rows, cols, job.tile, batch_size=job.batch_size,
                device=device, tta=job.tta, precision=job.precision, memory_budget=job.memory_budget,
                progress=False)[0, job.class_index, top:, left:]
        _require_finite(probabilities)
        if job.dtype == "uint8":
            probabilities = np.rint(probabilities * 255).astype(np.uint8)
        target[((z,) if source.ndim == 3 else ()) + (out_rows, out_cols)] = probabilities
    (Path(job.target) / DONE / _marker(block_id)).touch()
    return np.ones((1, 1, 1), dtype=bool)


def _open_source(zarr, source) -> tuple[Path, object, dict | None]:
    """The input array's path, the array, and for an OME-Zarr image group (whose full-resolution
    dataset is the input) the path of that dataset and the group metadata to copy."""
    path = Path(source).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such Zarr array or OME-Zarr image")
    if not any((path / name).is_file() for name in METADATA):
        raise ValueError(f"{source} is not a Zarr array (no zarr.json or .zarray in it); give a Zarr array "
                         "of shape (Y, X) or (Z, Y, X), or an OME-Zarr image group")
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return path, node, None
    attributes = node.attrs.asdict()
    ome = attributes.get("ome", attributes)  # OME-Zarr 0.5 nests its metadata under "ome"
    try:
        image = ome["multiscales"][0]
        dataset = image["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{source} is a Zarr group without OME-Zarr multiscales metadata; give the path of "
                         "the array inside it") from None
    # The geometry of the full-resolution level; not the other levels, nor "omero" (the input's display).
    copied = {key: image[key] for key in ("version", "axes", "coordinateTransformations") if key in image}
    multiscales = {"multiscales": [{**copied, "datasets": image["datasets"][:1]}]}
    if "ome" in attributes:
        multiscales = {"ome": {**{key: ome[key] for key in ("version",) if key in ome}, **multiscales}}
    return path / dataset, node[dataset], {"path": dataset, "attributes": multiscales}


def _block_shape(block, shape: tuple, chunks: tuple, steps: tuple[int, int], border: int) -> tuple[int, int, int]:
    """(slices, height, width) of an output block: ``block`` (one side, (height, width), or for a stack
    (slices, height, width)). In-plane sides must be multiples of the tile step, so that a block holds
    whole tiles of ``predict``. Default: the input's chunk depth, and in the plane the smallest multiple
    of the step that is at least 2 (chunk side + 2 border). A block decodes every input chunk its
    tiles' borders reach, about (side + 2 border + chunk side) / side of its own per axis: at most 1.5."""
    depth = chunks[0] if len(shape) == 3 else 1
    if block is None:
        return (depth, *(-(-2 * (c + 2 * border) // step) * step for c, step in zip(chunks[-2:], steps)))
    sides = (block, block) if isinstance(block, int) else tuple(block)
    sides = (depth, *sides) if len(sides) == 2 else sides
    if len(sides) != 3 or (len(shape) == 2 and sides[0] != 1) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        layouts = "SIDE or (HEIGHT, WIDTH)" + (" or (SLICES, HEIGHT, WIDTH)" if len(shape) == 3 else "")
        raise ValueError(f"block must be {layouts} in positive integers, got {block!r}")
    for side, step in zip(sides[1:], steps):
        if side % step:
            near = " or ".join(str(n) for n in (side // step * step, (side // step + 1) * step) if n)
            raise ValueError(f"block side {side} is not a multiple of the tile step {step} (a block holds "
                             f"whole tiles, as predict lays them); use {near}")
    return sides


def _open_target(zarr, target: Path, path: Path, source, ome: dict | None, chunks: tuple, dtype: str,
                 settings: dict):
    """The output array at ``path`` in ``target``: created with its metadata (in a temporary folder renamed
    onto ``target``), or reopened to resume when it holds a prediction begun with the same ``settings``."""
    if target.exists():
        record = None
        if any((path / name).is_file() for name in METADATA):
            array = zarr.open(str(path), mode="r+")
            record = array.attrs.get(RECORD) if isinstance(array, zarr.Array) else None
        if record is None:
            raise ValueError(f"{target} exists and holds no prediction of ronneberger2015; choose another "
                             "output, or delete it")
        changed = [f"{key} {record.get(key)!r} there, {value!r} here" for key, value in settings.items()
                   if record.get(key) != value]
        if changed:
            raise ValueError(f"{target} holds a prediction begun with other settings ({'; '.join(changed)}); "
                             "resume with the same settings, or choose another output")
        return array
    fmt = source.metadata.zarr_format
    names = getattr(source.metadata, "dimension_names", None) if fmt == 3 else None
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        group = zarr.create_group(str(tmp), zarr_format=fmt, attributes=ome["attributes"]) if ome else None
        options = dict(shape=source.shape, chunks=chunks, dtype=dtype, fill_value=np.nan if dtype == "float32" else 0,
                       zarr_format=fmt, dimension_names=names, attributes={RECORD: {**settings, "complete": False}})
        if group is not None:
            group.create_array(ome["path"], **{k: v for k, v in options.items() if k != "zarr_format"})
        else:
            zarr.create_array(str(tmp), **options)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return zarr.open_array(str(path), mode="r+")


def _local_workers(workers: int | None, device: str | None) -> int:
    """``workers``, or one per GPU (unless ``device`` is the CPU), else one per 4 CPU cores."""
    gpus = torch.cuda.device_count() if device is None or torch.device(device).type == "cuda" else 0
    workers = (gpus or max(1, (os.cpu_count() or 1) // 4)) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return workers


@contextlib.contextmanager
def local_cluster(workers: int | None = None, *, device: str | None = None, **options):
    """The Dask ``LocalCluster`` ``predict_volume`` starts: ``workers`` processes (default one per GPU,
    else one per 4 CPU cores) of one thread, each with an equal share of the cores for torch.
    ``options`` go to ``LocalCluster`` (e.g. ``memory_limit``). Give ``cluster.scheduler_address`` as
    ``scheduler`` to predict several volumes on the same workers.

    Dask's nannies set ``MALLOC_TRIM_THRESHOLD_`` in their workers, which fixes glibc's mmap threshold:
    each large buffer of a forward pass is then mapped and faulted in anew (1.4x slower on the CPU,
    docs/performance.md). These workers keep glibc's default.
    """
    distributed = _require()[2]
    import dask

    workers = _local_workers(workers, device)
    environ = {key: value for key, value in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if key != "MALLOC_TRIM_THRESHOLD_"}
    environ["OMP_NUM_THREADS"] = max(1, (os.cpu_count() or 1) // workers)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                                     **options) as cluster:
        yield cluster


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None, device: str | None):
    """A Dask client of the cluster at ``scheduler``, or of a ``local_cluster`` for the time it is open."""
    distributed = _require()[2]
    with contextlib.ExitStack() as stack:
        cluster = scheduler if scheduler is not None else stack.enter_context(local_cluster(workers, device=device))
        yield stack.enter_context(distributed.Client(cluster))


def _compute(job: _Job, grid: tuple, model: UNet | None, scheduler: str | None, workers: int | None,
             device: str | None, progress: bool) -> None:
    """Compute the blocks of ``grid`` not yet marked done, as a dask array of one element per block;
    ``model`` (None: each worker loads the checkpoint) is sent once to each worker."""
    _, dask_array, distributed = _require()
    done = set(os.listdir(Path(job.target) / DONE))
    with _client(scheduler, workers, device) as client, \
            tqdm(total=int(np.prod(grid)), initial=len(done), unit="block", desc="predict_volume",
                 disable=not progress) as bar:
        sent = {"model": client.scatter(model, broadcast=True, hash=False)} if model is not None else {}
        blocks = dask_array.map_blocks(_predict_block, chunks=tuple((1,) * n for n in grid), dtype=bool,
                                       meta=np.empty((0, 0, 0), bool), job=job, **sent)
        futures = client.compute([task for index, task in np.ndenumerate(blocks.to_delayed())
                                  if _marker(index) not in done])
        try:
            for future in distributed.as_completed(futures):
                future.result()
                bar.update()
        except BaseException:
            client.cancel(futures)
            raise


def predict_volume(
    model: UNet | str | os.PathLike,
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    tta: bool = False,
    output_tile: int | tuple[int, int] | None = None,
    block: int | tuple[int, ...] | None = None,
    dtype: str = "float32",
    class_index: int = 1,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = False,
):
    """Probability of class ``class_index`` of a Zarr volume, written to a Zarr array block by block (Fig. 2).

    Parameters
    ----------
    model : UNet | str | os.PathLike
        a single-channel ``UNet``, sent once to each worker, or a
        checkpoint path, which each worker loads once.
    source : str | os.PathLike
        a Zarr array (Y, X) or stack (Z, Y, X) of slices (uint8,
        uint16 or float in [0, 1], as ``predict``), or an OME-Zarr image
        group, whose full-resolution dataset is read.
    target : str | os.PathLike
        the output folder: a Zarr array of the input's shape and Zarr
        format; for an OME-Zarr input, an OME-Zarr image with its
        full-resolution dataset's path and the input's axes and scales.
        If it holds an unfinished prediction begun with the same
        settings, the prediction resumes.
    tta, output_tile, batch_size, precision, memory_budget
        as ``predict``;
        the tile grid is the one ``predict`` lays over the whole image.
    block : int | tuple[int, ...] | None
        output block: one side, (height, width), or for a stack
        (slices, height, width); in-plane sides are multiples of the tile
        step. Default: the input's chunk depth by the smallest multiple of
        the step covering its chunk side. The output's chunks are one
        slice of a block (the whole block for a 2D image).
    dtype : str
        "float32", or "uint8" (probability x 255, rounded).
    class_index : int
        the class written; 1 is the cell interior.
    device : str | None
        cpu or cuda; default: each worker's GPU if it has one.
    scheduler : str | None
        address of a Dask scheduler (e.g. "tcp://10.0.0.1:8786");
        its workers must import this package and see both paths. Default:
        a LocalCluster on this machine.
    workers : int | None
        the LocalCluster's worker processes (one thread each);
        default one per GPU, else one per 4 CPU cores.
    progress : bool
        show a progress bar over blocks.

    Returns
    -------
    zarr.Array
        The output, opened read-only. Each block's result
        equals ``predict`` on the whole array in memory, to float rounding.
    """
    zarr = _require()[0]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    checkpoint = None
    if not isinstance(model, torch.nn.Module):
        checkpoint = str(Path(model).resolve())
        model = load_model(checkpoint)
    if model.in_channels != 1:
        raise ValueError(f"the model takes {model.in_channels} input channels; volumes are single-channel "
                         "(Y, X) or (Z, Y, X) arrays, so give a single-channel model")
    if isinstance(class_index, bool) or not isinstance(class_index, int) or not 0 <= class_index < model.num_classes:
        raise ValueError(f"class_index must be one of the model's classes 0..{model.num_classes - 1}, "
                         f"got {class_index!r}")
    if scheduler is None and device is not None:
        resolve_device(device)  # a cluster elsewhere checks it on its workers
    if scheduler is not None and workers is not None:
        raise ValueError(f"workers applies to the local cluster; the cluster at {scheduler} has its own")
    if scheduler is None:
        _local_workers(workers, device)  # checked before anything is written
    source_root = Path(source).resolve()
    source_path, array, ome = _open_source(zarr, source)
    target = Path(target).resolve()
    if target == source_root or source_root in target.parents:
        raise ValueError(f"the output {target} is the input or lies inside it; choose another output path")
    if array.ndim not in (2, 3):
        raise ValueError(f"{source}: expected a (Y, X) image or a (Z, Y, X) stack of slices, got shape {array.shape}")
    image_to_float(np.zeros(0, array.dtype))  # the input's type is one predict reads
    size = array.shape[-2:]
    tile = _tile_sides(model, output_tile, size, precision, memory_budget)
    period = 2**model.depth
    spans = tuple(_spans(n, t, period)[0] for n, t in zip(size, tile))
    steps = tuple(t - t % period for t in tile)  # consecutive tiles of predict step by this much
    block = _block_shape(block, array.shape, array.chunks, steps, model.border)
    per_block = (block[0], *(side // step for side, step in zip(block[1:], steps)))
    chunks = (1, *block[1:]) if array.ndim == 3 else block[1:]
    fingerprint = _fingerprint(model)
    settings = {"source": str(source_path), "model": fingerprint, "tile": list(tile), "block": list(block),
                "tta": tta, "precision": precision, "class": class_index, "dtype": dtype}
    path = target / ome["path"] if ome else target
    output = _open_target(zarr, target, path, array, ome, tuple(min(c, n) for c, n in zip(chunks, array.shape)),
                          dtype, settings)
    done_dir = path / DONE
    if not output.attrs[RECORD]["complete"]:
        done_dir.mkdir(exist_ok=True)
        grid = (-(-array.shape[0] // block[0]) if array.ndim == 3 else 1,
                *(-(-len(s) // m) for s, m in zip(spans, per_block[1:])))
        job = _Job(str(source_path), str(path), checkpoint, fingerprint, spans, tile, per_block,
                   model.border, class_index, dtype, tta, precision, batch_size, memory_budget, device)
        _compute(job, grid, None if checkpoint else model, scheduler, workers, device, progress)
        output.attrs[RECORD] = {**output.attrs[RECORD], "complete": True}
    shutil.rmtree(done_dir, ignore_errors=True)
    return zarr.open_array(str(path), mode="r")


def names_zarr(argv: list[str]) -> bool:
    """Whether the ``predict`` command's arguments name a Zarr store (then ``cli`` runs it)."""
    return any(is_zarr(arg) for arg in argv if not arg.startswith("-"))


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m ronneberger2015 predict IN.zarr -o OUT.zarr --checkpoint CKPT``: a volume larger than memory,
    block by block on Dask."""
    parser = argparse.ArgumentParser(prog=prog, description="Overlap-tile prediction (Fig. 2) of a Zarr volume "
                                     "larger than memory, block by block with Dask: a Zarr array of cell-interior "
                                     "probabilities; a run started again resumes.")
    add_prediction_options(parser, "Zarr array (Y, X) or (Z, Y, X), or an OME-Zarr image group")
    parser.add_argument("--membrane", action="store_true",
                        help="write the membrane probability (class 0) instead of the cell interior (class 1)")
    group = parser.add_argument_group("Zarr volumes (pip install 'ronneberger2015[volume]')")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="uint8: probability x 255, rounded")
    group.add_argument("--block", type=int, nargs="+", metavar="N",
                       help="output block: SIDE, HEIGHT WIDTH, or SLICES HEIGHT WIDTH; in-plane multiples of the "
                            "tile step (default: the input's chunk depth, and its chunk side rounded up to the step)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler (default: a local cluster)")
    group.add_argument("--workers", type=int, help="local cluster's worker processes "
                       "(default: one per GPU, else one per 4 CPU cores)")
    args = parser.parse_args(argv)
    require(parser, args, "output", "-o/--output")
    block = args.block[0] if args.block and len(args.block) == 1 else args.block
    predict_volume(args.checkpoint, args.input, args.output, tta=args.tta, output_tile=args.output_tile, block=block,
                   dtype=args.dtype, class_index=0 if args.membrane else 1, batch_size=args.batch_size,
                   device=args.device, precision=args.precision, scheduler=args.scheduler, workers=args.workers,
                   progress=True)
    return 0
