"""Shared fixtures: the ISBI 2012 and cell tracking challenge folders, the ISBI metrics oracle, a loopback
HTTP server, a synthetic cell tracking data set, and deterministic torch on the CPU."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """The ISBI 2012 folder. Skips only when no location is configured at all;
    fails when ``ISBI2012_DIR`` is set but the files are not there."""
    from ronneberger2015.data import FILES

    configured = os.environ.get("ISBI2012_DIR")
    directory = Path(configured) if configured else Path("data/isbi2012")
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing and not configured:
        pytest.skip("ISBI 2012 data not found: set ISBI2012_DIR or run `python -m ronneberger2015.data fetch`")
    assert not missing, f"ISBI2012_DIR={configured} lacks {missing}"
    return directory


@pytest.fixture(scope="session")
def isbi(isbi_dir):
    """The verified ISBI 2012 stacks (train images, train labels, test images)."""
    from ronneberger2015.data import load_isbi

    return load_isbi(isbi_dir)


@pytest.fixture(scope="session")
def metrics_oracle() -> Path:
    """Proposals and truth with what the ISBI 2012 challenge's own evaluation code gives for them (its
    README). Skips only when ``METRICS_ORACLE_DIR`` is not set; fails when it is set but a file listed in
    its ``SHA256SUMS`` is missing or differs."""
    configured = os.environ.get("METRICS_ORACLE_DIR")
    if not configured:
        pytest.skip("ISBI metrics oracle not found: set METRICS_ORACLE_DIR to its folder")
    directory = Path(configured)
    assert (directory / "SHA256SUMS").is_file(), f"METRICS_ORACLE_DIR={configured} lacks SHA256SUMS"
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert (directory / name).is_file(), f"METRICS_ORACLE_DIR={configured} lacks {name}"
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, f"{name} differs from SHA256SUMS"
    return directory


@pytest.fixture
def http_root(tmp_path):
    """A throw-away HTTP server on 127.0.0.1 serving ``tmp_path / "www"``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def ctc_dir() -> Path:
    """The cell tracking challenge folder (PhC-C2DH-U373 sequence 02 with GT, DIC-C2DH-HeLa sequence 01 with
    silver truth). Skips only when ``CTC_DIR`` is not set; fails when it is set but the files are not there."""
    configured = os.environ.get("CTC_DIR")
    if not configured:
        pytest.skip("cell tracking challenge frames not found: set CTC_DIR to a folder in the challenge's layout")
    directory = Path(configured)
    needed = ["PhC-C2DH-U373/02_GT/SEG/man_seg010.tif", "PhC-C2DH-U373/02/t010.tif",
              "DIC-C2DH-HeLa/01_ST/SEG/man_seg000.tif", "DIC-C2DH-HeLa/01/t000.tif"]
    missing = [name for name in needed if not (directory / name).is_file()]
    assert not missing, f"CTC_DIR={configured} lacks {missing}"
    return directory


def synthetic_ctc(folder: Path, name: str = "PhC-C2DH-U373", *, frames: int = 4, size=(96, 120), seed: int = 0) -> Path:
    """A small data set in the challenge's layout under ``folder / name``: sequences 01 and 02, bright discs
    (some touching) on a noisy background, LZW-compressed uint8 frames, uint16 gold truth of every other frame
    (partial: the last disc of each frame is left unlabelled). Returns ``folder / name``."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: size[0], : size[1]]
    for sequence in ("01", "02"):
        (folder / name / sequence).mkdir(parents=True)
        (folder / name / f"{sequence}_GT" / "SEG").mkdir(parents=True)
        for t in range(frames):
            labels = np.zeros(size, np.uint16)
            centres = [(rng.integers(20, size[0] - 20), rng.integers(20, size[1] - 20)) for _ in range(4)]
            centres[1] = (centres[0][0], centres[0][1] + 22)  # touches cell 1
            for cell, (y, x) in enumerate(centres, start=1):
                labels[(rows - y) ** 2 + (cols - x) ** 2 < 12 ** 2] = cell
            image = np.clip(60 + 90 * (labels > 0) + rng.normal(0, 12, size), 0, 255).astype(np.uint8)
            tifffile.imwrite(folder / name / sequence / f"t{t:03d}.tif", image, compression="lzw")
            if t % 2 == 0:
                labels[labels == 4] = 0
                tifffile.imwrite(folder / name / f"{sequence}_GT" / "SEG" / f"man_seg{t:03d}.tif", labels,
                                 compression="lzw")
    return folder / name
