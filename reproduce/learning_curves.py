"""``python -m reproduce.learning_curves``: several runs' learning curves in one picture.

Reads the log.csv of each run folder (written by ``train`` with validation
data, e.g. ``python -m reproduce.isbi --held-out-only``) and draws, against the
iteration, the running mean of the loss (Eq. 1) and the held-out V_rand and
Rand error logged every ``validate_every`` iterations. The picture in
docs/results.md was drawn with

    python -m reproduce.learning_curves RUN/held-out ... --labels ... -o docs/images/isbi_cpu_learning_curves.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ronneberger2015.io import save_figure
from ronneberger2015.training import read_log

PANELS = (("vrand", "held-out V_rand (higher is better)"), ("rand_error", "held-out Rand error (lower is better)"))


def figure(runs: dict[str, list[dict]], window: int = 200) -> Figure:
    """Loss (running mean over ``window`` iterations) and the validation scores of each run."""
    figure = Figure(figsize=(7, 8), layout="constrained")
    loss_axes, *score_axes = figure.subplots(1 + len(PANELS), 1, sharex=True)
    for label, rows in runs.items():
        losses = np.array([row["loss"] for row in rows])
        if len(losses) >= window:
            mean = np.convolve(losses, np.ones(window) / window, mode="valid")
            loss_axes.plot([row["iteration"] for row in rows][window - 1 :], mean, lw=1.2, label=label)
        validated = [row for row in rows if "vrand" in row]
        for axes, (name, _) in zip(score_axes, PANELS):
            axes.plot([row["iteration"] for row in validated], [row[name] for row in validated], marker="o",
                      ms=3, label=label)
    loss_axes.set(ylabel=f"loss, mean of {window} iterations", yscale="log")
    score_axes[0].legend(fontsize="small")
    for axes, (_, shown) in zip(score_axes, PANELS):
        axes.set(ylabel=shown)
        axes.grid(alpha=0.3)
    score_axes[-1].set(xlabel="iteration")
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.learning_curves", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding a log.csv")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    labels = args.labels or [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    runs = {label: read_log(run / "log.csv") for label, run in zip(labels, args.runs)}
    if empty := [str(run) for run, rows in zip(args.runs, runs.values()) if not rows]:
        parser.error(f"no log.csv rows in {', '.join(empty)}")
    save_figure(figure(runs), args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
