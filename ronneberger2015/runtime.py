"""Where and how the network runs: the device, the precision (fp32, or bf16 autocast) and the memory layout.

Training (Sec. 3) and prediction (Fig. 2) run the network the same way; this
module is what they share, so that neither needs the other.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "BYTES", "resolve_device", "check_precision", "autocast"]

PRECISIONS = ("fp32", "bf16")
"""fp32, the reference; or bf16 autocast around the network (weights, gradients, momentum and loss in float32)."""

BYTES = {"fp32": 4, "bf16": 2}
"""Bytes per activation for each precision."""


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device ``name`` names, checked; by default CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {str(name)!r} is not a device name ({error}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} was asked for, but CUDA is not available here; use cpu")
    return device


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for precision "bf16"; nothing for "fp32"."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
