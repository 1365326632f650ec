"""Reading and writing images, stacks and run files; every write is atomic.

Images come in as TIFF (one page, or a stack of pages), PNG or GIF and leave as
float32 TIFF, one page per slice, the ISBI 2012 submission format. Every file
is first written under a temporary name in its target folder and then renamed
over the target, so a run that is killed never leaves a half-written file and
never destroys the previous good copy.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
import torch
from PIL import Image
from skimage import io as skio
from tqdm import tqdm

__all__ = [
    "atomic_path",
    "DataError",
    "download",
    "new_folders",
    "IMAGE_SUFFIXES",
    "read_image",
    "read_images",
    "output_files",
    "write_tiff",
    "write_image",
    "write_json",
    "read_json",
    "save_figure",
    "save_checkpoint",
    "load_checkpoint",
    "image_to_float",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched; a
    full disk is named as such.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created by the writer itself, so the file gets the user's umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"no space left on device while writing {path}; the previous {path.name}, if "
                      "any, is unchanged: free some space and run again") from error
    finally:
        tmp.unlink(missing_ok=True)


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".gif")
"""The image files every command reads: TIFF (one page or a stack), PNG and GIF, one grey channel."""


class DataError(ValueError):
    """A data set's files are missing, corrupt, or not the published ones."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF (2D page or multi-page stack), a PNG or a GIF as a numpy array.

    Returns (H, W) for a single image and (Z, H, W) for a stack. Colour images
    (RGB or RGBA samples, a palette with colours) are refused, not converted:
    the network takes one grey channel. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file for one that cannot be
    decoded, and the package to install where a codec is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .tif, .tiff, .png or .gif")
    try:
        array, colour = _decode(path, suffix)
    except Exception as error:  # decoders raise many types for a corrupt file
        if "imagecodecs" in str(error):
            raise ValueError(f"{path}: its compression needs the imagecodecs package ({error}); "
                             "pip install imagecodecs") from error
        raise ValueError(f"{path}: cannot be read as an image ({error}); is the file complete?") from error
    if colour:
        raise ValueError(f"{path}: a colour image (shape {array.shape}); the network takes one grey channel: "
                         "convert it first, e.g. keep one channel or use skimage.color.rgb2gray, and save it as "
                         "a grey TIFF or PNG")
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2D image or a stack of 2D slices, got shape {array.shape}")
    return array


def _decode(path: Path, suffix: str) -> tuple[np.ndarray, bool]:
    """The pixels of ``path`` and whether they are colour."""
    if suffix in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            return series.asarray(), "S" in series.axes  # S: samples per pixel (RGB, RGBA)
    if suffix == ".gif":
        with Image.open(path) as image:  # the first frame; palette and grey GIFs hold indices or grey levels
            rgb = np.asarray(image.convert("RGB"))
        grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return (rgb[..., 0], False) if grey else (rgb, True)
    array = skio.imread(path)
    return array, array.ndim == 3 and array.shape[-1] in (2, 3, 4)


def read_images(path: str | os.PathLike) -> tuple[np.ndarray, list[Path]]:
    """A (Z, H, W) stack and the files it came from: a TIFF stack or one image file, or a folder of images
    (``IMAGE_SUFFIXES``, one slice each, in the order of their sorted names, all of one size)."""
    path = Path(path)
    if not path.is_dir():
        array = read_image(path)
        return (array if array.ndim == 3 else array[None]), [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{path}: a folder with no {', '.join(IMAGE_SUFFIXES)} files")
    slices = [read_image(p) for p in files]
    stacks = [f.name for f, s in zip(files, slices) if s.ndim != 2]
    if stacks:
        raise ValueError(f"{path}: a folder holds one 2D image per file, but {stacks[0]} is a stack")
    sizes = sorted({s.shape for s in slices})
    if len(sizes) > 1:
        raise ValueError(f"{path}: the images differ in size ({', '.join(f'{h}x{w}' for h, w in sizes)}); "
                         "crop or pad them to one size, or give them one by one")
    return np.stack(slices), files


def output_files(source: Path, files: list[Path], output: Path, *, floats: bool) -> list[Path]:
    """Where to write the result for each of ``files`` (as ``read_images(source)`` gave them).

    For a file, ``output`` itself (.tif/.tiff; also .png unless ``floats``);
    for a folder, the same names in the folder ``output``: float results as
    NAME.tif, integer ones (masks, labels) in the input's format, GIF as PNG.
    Refuses any output that is one of the inputs (also through another path
    or a link), before anything is computed.
    """
    if source.is_dir():
        if output.exists() and not output.is_dir():
            raise ValueError(f"{source} is a folder: -o/--output must be a folder too, but {output} is a file")
        targets = [output / (f.stem + ".tif" if floats else
                             f.name if f.suffix.lower() in (".tif", ".tiff", ".png") else f.stem + ".png")
                   for f in files]
    else:
        suffixes = (".tif", ".tiff") if floats else (".tif", ".tiff", ".png")
        if output.suffix.lower() not in suffixes:
            what = "float results are" if floats else "masks and labels are"
            raise ValueError(f"{output}: {what} written as {' or '.join(suffixes)}; name the output so")
        targets = [output]
    for target in targets:
        for file in files:
            if target.resolve() == file.resolve() or (target.exists() and target.samefile(file)):
                raise ValueError(f"{target} is an input: writing it would destroy {file}; choose another output")
    return targets


def write_tiff(path: str | os.PathLike, array: np.ndarray, *, compression: str | None = None) -> None:
    """Write ``array`` ((H, W) or (Z, H, W)) atomically as a TIFF, one page per slice; ``compression`` is
    tifffile's name of a codec ("zlib" is read without imagecodecs)."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.asarray(array), photometric="minisblack", compression=compression)


def write_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` atomically: TIFF (any dtype; a stack one page per slice) or PNG (one 2D uint8 or
    uint16 image), by the suffix of ``path``."""
    path, array = Path(path), np.asarray(array)
    if path.suffix.lower() in (".tif", ".tiff"):
        return write_tiff(path, array)
    if path.suffix.lower() != ".png" or array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: PNG holds one 2D uint8 or uint16 image, not {array.dtype} {array.shape}; "
                         "write a .tif")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` atomically as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    """Read a JSON file written by ``write_json``; ``ValueError`` naming the file if it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error


def save_figure(figure, path: str | os.PathLike, **kwargs) -> None:
    """Save a matplotlib figure atomically (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write a checkpoint dict atomically with ``torch.save``: the previous one survives a kill."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain data only).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    the file for one that is truncated, corrupt or not a checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    with open(path, "rb") as source:
        head = source.read(8)
    if head[:4] in (b"II*\x00", b"MM\x00*") or head.startswith(b"\x89PNG") or head[:3] == b"GIF":
        raise ValueError(f"{path} is an image, not a checkpoint: give the checkpoint.pt or best.pt of a training run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): it is corrupt or incomplete"
        ) from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"{path} is not a ronneberger2015 checkpoint (no 'model' and 'config' entries)")
    return checkpoint


def image_to_float(image: np.ndarray) -> np.ndarray:
    """Return the image as float32 in [0, 1], as the authors' release does (``im2double``).

    uint8 is divided by 255 and uint16 by 65535; a float image must already lie
    in [0, 1] and contain no NaN. Nothing is rescaled per image.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype == bool or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image dtype {image.dtype} is not supported; give uint8, uint16 or float in [0, 1]")
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values; clean or mask them before segmenting")
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
        raise ValueError(
            f"float image values span [{image.min():.3g}, {image.max():.3g}], not [0, 1]; "
            "rescale it (e.g. divide by its maximum) or pass the original integer image"
        )
    return image


def download(url: str, target: Path, what: str) -> None:
    """Save ``url`` as ``target`` with a progress bar named ``what``."""
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=what) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


@contextlib.contextmanager
def new_folders(folder: Path):
    """Create ``folder`` (and missing parents) for the duration; on failure remove those it created, if empty."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
