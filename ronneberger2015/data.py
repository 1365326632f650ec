"""The ISBI 2012 EM segmentation data (paper Sec. 4): locate, verify, load, fetch.

The three stacks are 30 x 512 x 512 uint8 serial-section TEM slices of the
Drosophila first-instar larva ventral nerve cord (Cardona et al. 2010); in the
labels 255 marks cell interior and 0 membrane. Where the files are:

1. an explicit ``directory`` argument (``--data-dir`` on the commands),
2. the environment variable ``ISBI2012_DIR``,
3. ``data/isbi2012/`` under the current working directory, where ``fetch``
   puts them.

Each file is checked against the sha256 of its pixel content (the C-ordered
uint8 array bytes, which do not depend on how the TIFF is encoded).

Command line: ``python -m ronneberger2015.data fetch [--data-dir DIR]`` downloads
and verifies the public archive; ``python -m ronneberger2015.data verify``
checks a copy. ``python -m ronneberger2015.data fetch ctc NAME`` fetches a data
set of the cell tracking challenge instead (``ronneberger2015.ctc``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import ctc
from .commandline import renamed
from .io import DataError, download, new_folders, read_image

__all__ = [
    "FILES",
    "PIXEL_SHA256",
    "URL",
    "DataError",
    "IsbiData",
    "data_dir",
    "load",
    "load_isbi",
    "fetch",
]

URL = "https://downloads.imagej.net/ISBI-2012-challenge.zip"
SHAPE = (30, 512, 512)
PIXEL_SHA256 = {
    "train-volume.tif": "200da3d452d726e6c9ca1ce04b869d4edb727320d23b516d01cce707dc8c4760",
    "train-labels.tif": "a7cb64000a1a7e542682927e19c91339f58f9f178e0bcce4e207371116f0ca36",
    "test-volume.tif": "1b58fa7ec1d0ff9d39a855622db3ff66a97863036339b0d04be51b2f5a99b0e9",
}
FILES = tuple(PIXEL_SHA256)
DEFAULT_DIR = Path("data") / "isbi2012"


class IsbiData(NamedTuple):
    """The three published stacks, uint8, each 30 x 512 x 512."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray


def _how_to_get(directory: Path) -> str:
    return (
        "get the ISBI 2012 data in one of two ways:\n"
        f"  python -m ronneberger2015.data fetch --data-dir {directory}   (downloads {URL})\n"
        "  export ISBI2012_DIR=/path/to/a/copy   (a folder holding " + ", ".join(FILES) + ")"
    )


def data_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder to read the ISBI files from: argument, then ``$ISBI2012_DIR``, then data/isbi2012."""
    if directory is not None:
        return Path(directory)
    if os.environ.get("ISBI2012_DIR"):
        return Path(os.environ["ISBI2012_DIR"])
    return DEFAULT_DIR


def pixel_sha256(array: np.ndarray) -> str:
    """sha256 of the C-ordered array bytes."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _check(name: str, array: np.ndarray, path: Path) -> None:
    if array.shape != SHAPE or array.dtype != np.uint8:
        raise DataError(
            f"{path}: expected a {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} uint8 stack, got shape {array.shape} "
            f"dtype {array.dtype}; this is not the published {name}"
        )
    if pixel_sha256(array) != PIXEL_SHA256[name]:
        raise DataError(
            f"{path}: pixel content does not match the published checksum; the file is corrupt or was "
            f"modified. Replace it: {_how_to_get(path.parent)}"
        )
    if name == "train-labels.tif" and not np.isin(array, (0, 255)).all():
        raise DataError(f"{path}: labels must be 0 (membrane) or 255 (cell interior)")


def load(name: str, directory: str | os.PathLike | None = None, *, verify: bool = True) -> np.ndarray:
    """Load one ISBI stack by file name (e.g. ``"train-labels.tif"``), checked against its checksum."""
    if name not in PIXEL_SHA256:
        raise ValueError(f"unknown ISBI 2012 file {name!r}; expected one of {FILES}")
    folder = data_dir(directory)
    path = folder / name
    if not path.is_file():
        raise DataError(f"ISBI 2012 file {path} not found; {_how_to_get(folder)}")
    try:
        array = read_image(path)
    except ValueError as error:
        raise DataError(f"{error}. Replace it: {_how_to_get(folder)}") from error
    if verify:
        _check(name, array, path)
    return array


def load_isbi(directory: str | os.PathLike | None = None, *, verify: bool = True) -> IsbiData:
    """Load and verify all three ISBI 2012 stacks."""
    return IsbiData(*(load(name, directory, verify=verify) for name in FILES))


def fetch(directory: str | os.PathLike | None = None, *, url: str = URL, force: bool = False) -> Path:
    """Download the public ISBI 2012 archive and install the three stacks, verified.

    ``directory`` defaults to ``data_dir()``: ``$ISBI2012_DIR``, then
    data/isbi2012. Files are unpacked and checked in a temporary folder beside
    it and only then renamed into place, so a failed or interrupted fetch
    leaves the disk as it was (no folder is left behind). Files already
    present and valid are kept unless ``force``. Returns the folder.
    """
    folder = data_dir(directory)
    if not force:
        try:
            load_isbi(folder)
            return folder
        except DataError:
            pass
    with new_folders(folder.parent), tempfile.TemporaryDirectory(prefix=".isbi2012-", dir=folder.parent) as tmp:
        archive = Path(tmp) / "archive.zip"
        try:
            download(url, archive, "ISBI 2012 archive")
        except OSError as error:
            raise DataError(f"could not download {url} ({error}); download it by hand and point ISBI2012_DIR at "
                            "the unpacked folder") from error
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = {Path(info.filename).name: info for info in zipped.infolist() if not info.is_dir()}
                absent = [name for name in FILES if name not in members]
                if absent:
                    raise DataError(f"{url}: the archive lacks {absent}; is this the ISBI 2012 archive?")
                for name in FILES:
                    with zipped.open(members[name]) as source, open(Path(tmp) / name, "wb") as out:
                        shutil.copyfileobj(source, out)
        except zipfile.BadZipFile as error:
            raise DataError(f"{url}: not a valid zip archive ({error})") from error
        load_isbi(tmp)  # verify before anything is moved into place
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            os.replace(Path(tmp) / name, folder / name)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ronneberger2015.data",
                                     description="ISBI 2012 data; the cell tracking challenge's with fetch ctc NAME")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help=f"download and verify the archive ({URL}), or with `ctc NAME` a data set of "
                         "the cell tracking challenge")
    get.add_argument("dataset", nargs="?", choices=("isbi2012", "ctc"), default="isbi2012",
                     help="isbi2012 (default) or ctc, the cell tracking challenge")
    get.add_argument("name", nargs="?", help=f"with ctc: the data set, one of {', '.join(ctc.DATASETS)}")
    get.add_argument("--data-dir", default=None, help=f"target folder (default: $ISBI2012_DIR, then {DEFAULT_DIR}; "
                     f"for ctc $CTC_DIR, then {ctc.DEFAULT_DIR})")
    renamed(get, "--dir", "--data-dir", dest="data_dir")
    get.add_argument("--url", help="archive address (default: the public mirror, or the challenge's archive)")
    get.add_argument("--sha256", default="published", help="with ctc: the archive's expected sha256 (default: the "
                     "published one; 'any' skips the check)")
    get.add_argument("--force", action="store_true", help="download even if a valid copy is there")
    check = sub.add_parser("verify", help="check a copy against the published pixel checksums")
    check.add_argument("--data-dir", default=None, help="folder (default: $ISBI2012_DIR, then data/isbi2012)")
    renamed(check, "--dir", "--data-dir", dest="data_dir")
    args = parser.parse_args(argv)
    if args.command == "fetch" and args.dataset == "ctc" and args.name not in ctc.DATASETS:
        parser.error(f"fetch ctc needs a data set name: {' or '.join(ctc.DATASETS)}")
    if args.command == "fetch" and args.dataset == "isbi2012" and args.name:
        parser.error(f"fetch isbi2012 takes no name (got {args.name!r}); did you mean fetch ctc {args.name}?")
    try:
        if args.command == "fetch" and args.dataset == "ctc":
            sha256 = None if args.sha256 == "any" else args.sha256
            folder = ctc.fetch(args.name, args.data_dir, url=args.url, sha256=sha256, force=args.force)
            print(f"{args.name} installed and loaded in {folder}")
        elif args.command == "fetch":
            print(f"ISBI 2012 data verified in {fetch(args.data_dir, url=args.url or URL, force=args.force)}")
        else:
            load_isbi(args.data_dir)
            print(f"ISBI 2012 data verified in {data_dir(args.data_dir)}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
