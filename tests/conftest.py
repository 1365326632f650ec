"""Shared fixtures: the ISBI 2012 folder, and deterministic torch on the CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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
