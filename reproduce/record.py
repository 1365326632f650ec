"""What every replay records about where and how it ran: device, threads, versions, commit and command."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ronneberger2015

__all__ = ["device_name", "environment"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return result.stdout.strip() or None


def environment(device: torch.device, script: str, argv: list[str] | None) -> dict:
    """The device, its name, torch's thread count, the versions, the git commit and the command line."""
    return {
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "versions": {"ronneberger2015": ronneberger2015.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "numpy": np.__version__},
        "git_commit": _git_commit(), "command": " ".join([f"python -m {script}", *(sys.argv[1:] if argv is None
                                                                                  else argv)]),
    }
