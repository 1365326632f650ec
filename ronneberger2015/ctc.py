"""The ISBI cell tracking challenge's 2D training data (paper Sec. 4, Table 2): locate, load, fetch; results.

The paper's second experiment segments two data sets of the challenge:
PhC-C2DH-U373 (glioblastoma-astrocytoma U373 cells on a polyacrylamide
substrate, phase contrast) and DIC-C2DH-HeLa (HeLa cells on glass, DIC). Each
training archive holds two sequences in the challenge's layout::

    NAME/01/t000.tif ...                 the frames (uint8 here)
    NAME/01_GT/SEG/man_seg010.tif ...    manual ("gold") segmentation truth of some frames:
                                         uint16, one id per cell, 0 = background; may be partial
    NAME/01_ST/SEG/man_seg000.tif ...    silver truth (computer-generated consensus), in later archives
    NAME/02/..., NAME/02_GT/...          the second sequence

Where the folders are: an explicit ``directory`` (``--data-dir``), then the
environment variable ``CTC_DIR``, then ``data/ctc/``; a data set is the
sub-folder ``NAME`` there. ``fetch`` downloads a public training archive and
checks its sha256; any folder in this layout can be used instead.

A segmentation result is written in the challenge's format: ``maskTTT.tif``,
uint16, one id per cell (``write_masks``).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .io import DataError, download, new_folders, read_image, write_tiff

__all__ = ["DATASETS", "Annotated", "data_dir", "sequences", "load", "fetch", "write_masks", "mask_name"]

ARCHIVES = "http://data.celltrackingchallenge.net/training-datasets"
DATASETS = {
    "PhC-C2DH-U373": "b18185c18fce54e8eeb93e4bbb9b201d757add9409bbf2283b8114185a11bc9e",
    "DIC-C2DH-HeLa": "832fed2d05bb7488cf9c51a2994b75f8f3f53b3c3098856211f2d39023c34e1a",
}
"""The two data sets of Table 2 and the sha256 of their training archives (``ARCHIVES``/NAME.zip), as
recorded by a third party; the challenge has re-issued its archives before."""

DEFAULT_DIR = Path("data") / "ctc"
TRUTHS = {"GT": "gold truth (manual)", "ST": "silver truth (computer-generated)"}
FRAME = re.compile(r"t(\d{3,4})\.tif")
TRUTH_FRAME = re.compile(r"man_seg(\d{3,4})\.tif")


class Annotated(NamedTuple):
    """The annotated frames of one sequence: images and truth (Z, H, W), their frame numbers, which truth."""

    name: str
    sequence: str
    truth: str
    frames: tuple[int, ...]
    images: np.ndarray
    labels: np.ndarray

    def __str__(self) -> str:
        return f"{self.name} sequence {self.sequence}: {len(self.frames)} frames with {TRUTHS[self.truth]}"


def data_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder holding the data sets: argument, then ``$CTC_DIR``, then data/ctc."""
    if directory is not None:
        return Path(directory)
    if os.environ.get("CTC_DIR"):
        return Path(os.environ["CTC_DIR"])
    return DEFAULT_DIR


def _how_to_get(name: str, folder: Path) -> str:
    return (f"get it in one of two ways:\n"
            f"  python -m ronneberger2015.data fetch ctc {name} --data-dir {folder}   "
            f"(downloads {ARCHIVES}/{name}.zip)\n"
            f"  export CTC_DIR=/path/to/a/folder   "
            f"(holding {name}/01, {name}/01_GT/SEG, ... in the challenge's layout)")


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    """The files of ``folder`` whose names match ``pattern``, by frame number."""
    return {int(m.group(1)): p for p in sorted(folder.iterdir()) if (m := pattern.fullmatch(p.name))}


def sequences(name: str, directory: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The annotated sequences of data set ``name``: ``[(sequence, truth), ...]``, gold truth ("GT") where a
    sequence has it, else silver truth ("ST"); ``DataError`` naming how to get the data if there are none."""
    folder = data_dir(directory) / name
    if not folder.is_dir():
        raise DataError(f"{folder} not found; {_how_to_get(name, folder.parent)}")
    found = []
    for images in sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"\d\d", p.name)):
        for truth in TRUTHS:
            if (folder / f"{images.name}_{truth}" / "SEG").is_dir():
                found.append((images.name, truth))
                break
    if not found:
        raise DataError(f"{folder} holds no sequence with segmentation truth (NN/ beside NN_GT/SEG/ or NN_ST/SEG/); "
                        f"{_how_to_get(name, folder.parent)}")
    return found


def load(name: str, sequence: str, directory: str | os.PathLike | None = None, *,
         truth: str | None = None) -> Annotated:
    """The annotated frames of one sequence and their truth (``truth``: "GT", "ST", or None for ``sequences``'s
    choice), checked: every truth file has its frame, both are 2D of one size, the truth is integer ids."""
    folder = data_dir(directory) / name
    if truth is None:
        truth = dict(sequences(name, directory)).get(sequence)
        if truth is None:
            raise DataError(f"{folder / sequence} has no segmentation truth ({sequence}_GT/SEG or {sequence}_ST/SEG)")
    truth_folder = folder / f"{sequence}_{truth}" / "SEG"
    if not truth_folder.is_dir():
        raise DataError(f"{truth_folder} not found")
    labelled = _numbered(truth_folder, TRUTH_FRAME)
    if not labelled:
        slices = [p.name for p in truth_folder.glob("man_seg*_*.tif")]
        what = f"3D truth ({slices[0]}): only the 2D data sets are supported" if slices else "no man_segTTT.tif file"
        raise DataError(f"{truth_folder}: {what}")
    frames = _numbered(folder / sequence, FRAME) if (folder / sequence).is_dir() else {}
    missing = sorted(set(labelled) - set(frames))
    if missing:
        raise DataError(f"{truth_folder} annotates frame(s) {missing} but {folder / sequence} lacks "
                        f"t{missing[0]:03d}.tif; "
                        "is the sequence complete?")
    images, labels = [], []
    for t, path in labelled.items():
        image, label = read_image(frames[t]), read_image(path)
        if image.ndim != 2 or label.shape != image.shape:
            raise DataError(f"{path} ({label.shape}) and {frames[t]} ({image.shape}) must be 2D images of one size")
        if label.dtype.kind not in "iu":
            raise DataError(f"{path}: truth of dtype {label.dtype}; the challenge's truth holds integer cell ids")
        images.append(image)
        labels.append(label)
    return Annotated(name, sequence, truth, tuple(labelled), np.stack(images), np.stack(labels))


def mask_name(frame: int) -> str:
    """The challenge's result file for a frame: mask000.tif (four digits from frame 1000 on)."""
    return f"mask{frame:03d}.tif"


def write_masks(folder: str | os.PathLike, frames, masks: np.ndarray) -> list[Path]:
    """Write one ``maskTTT.tif`` per frame into ``folder``, uint16 cell ids (the challenge's result format)."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != len(frames):
        raise ValueError(f"expected one (H, W) mask per frame, got {masks.shape} for {len(frames)} frames")
    if masks.max(initial=0) > np.iinfo(np.uint16).max or masks.min(initial=0) < 0:
        raise ValueError("cell ids must lie in 0..65535 to be written as uint16")
    paths = [Path(folder) / mask_name(t) for t in frames]
    for path, mask in zip(paths, masks):
        write_tiff(path, mask.astype(np.uint16))
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(archive: Path, name: str, target: Path, url: str) -> None:
    """Extract the members under ``name/`` (at any depth of the archive) into ``target/name``."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = []
            for info in zipped.infolist():
                parts = Path(info.filename).parts
                if info.is_dir() or name not in parts or ".." in parts or Path(info.filename).is_absolute():
                    continue
                members.append((info, Path(*parts[parts.index(name):])))
            if not members:
                raise DataError(f"{url}: the archive holds no folder {name}/; is this the {name} training archive?")
            for info, relative in members:
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(info) as source, open(target / relative, "wb") as out:
                    shutil.copyfileobj(source, out)
    except zipfile.BadZipFile as error:
        raise DataError(f"{url}: not a valid zip archive ({error})") from error


def fetch(name: str, directory: str | os.PathLike | None = None, *, url: str | None = None,
          sha256: str | None = "published", force: bool = False) -> Path:
    """Download the training archive of data set ``name``, check it and install ``NAME/`` in ``directory``.

    ``directory`` defaults to ``data_dir()``. ``sha256``: "published" checks
    the archive against ``DATASETS``; a hex digest checks against that one;
    None skips the check. Every annotated sequence is loaded once before the
    folder is renamed into place, so a failed fetch leaves the disk as it was.
    A valid copy already there is kept unless ``force``. Returns the folder.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; Table 2 uses {', '.join(DATASETS)}")
    folder = data_dir(directory)
    url = url or f"{ARCHIVES}/{name}.zip"
    expected = DATASETS[name] if sha256 == "published" else sha256
    if not force:
        try:
            for sequence, truth in sequences(name, folder):
                load(name, sequence, folder, truth=truth)
            return folder / name
        except DataError:
            pass
    with new_folders(folder), tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder) as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            download(url, archive, f"{name} archive")
        except OSError as error:
            raise DataError(f"could not download {url} ({error}); download it by hand, unpack it and point "
                            "CTC_DIR at the folder that holds it") from error
        got = _sha256(archive)
        if expected is not None and got != expected.lower():
            raise DataError(
                f"{url}: the archive's sha256 is {got}, not the recorded {expected}. The challenge has re-issued "
                "its archives before, so this need not be corruption; nothing was installed. If you trust the "
                f"download, run again with --sha256 {got}")
        _unpack(archive, name, Path(tmp) / "unpacked", url)
        for sequence, truth in sequences(name, Path(tmp) / "unpacked"):  # check before anything is moved
            load(name, sequence, Path(tmp) / "unpacked", truth=truth)
        old = Path(tmp) / "old"
        if (folder / name).exists():
            os.replace(folder / name, old)
        os.replace(Path(tmp) / "unpacked" / name, folder / name)
    return folder / name
