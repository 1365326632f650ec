"""What the commands share: one spelling per option, old spellings with a note, CPU threads.

Every command names things the same way: ``-o/--output`` is what it writes,
``--data-dir`` the ISBI 2012 folder, ``--input-tile`` the network's input
side (572 in Fig. 1) and ``--output-tile`` its output side (388).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

__all__ = ["renamed", "require", "add_threads", "set_threads"]


class _Renamed(argparse.Action):
    """An old spelling of an option: still accepted, with a note that names the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now called {self.new}; taking it as {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def renamed(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` (hidden from --help) as ``new``, storing into ``dest``, with a note on stderr."""
    parser.add_argument(old, action=_Renamed, new=new, dest=dest, help=argparse.SUPPRESS, **kwargs)


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, flag: str) -> None:
    """Exit with argparse's usage error when ``flag`` (which has an old spelling, so is not ``required``) is missing."""
    if getattr(args, dest) is None:
        parser.error(f"the following arguments are required: {flag}")


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads torch may use (default: torch's, one per core; on a machine shared "
                             "with other work fewer are often faster, see docs/performance.md)")


def set_threads(threads: int | None, *, note_if_busy: bool = False) -> None:
    """Apply ``--threads``; ``ValueError`` for a number below 1. Without it, for long work
    (``note_if_busy``) on a machine whose load average already reaches its core count, say that fewer
    threads are often much faster. The count is never chosen from the load: the thread count changes the
    rounding, so a seeded run depends on it."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if note_if_busy and torch.get_num_threads() > 1 and load >= cores:
        print(f"note: the load average ({load:.1f}) already reaches the {cores} cores; "
              f"torch's {torch.get_num_threads()} "
              "threads then wait on each other: --threads 1 is often several times faster (docs/performance.md)",
              file=sys.stderr)
