"""``python -m reproduce.augment_figure``: the picture in docs/augmentation.md (Sec. 3.1).

One 572x572 input tile of a grid image and of an ISBI 2012 training slice
(with its 388x388 labels), three ways: as cut out (no augmentation), with
the elastic deformation alone, and with every augmentation of Sec. 3.1.
The same random draws are used in the last two columns and in every row.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ronneberger2015.augment import Augmenter
from ronneberger2015.data import load_isbi
from ronneberger2015.io import image_to_float, save_figure

INPUT, OUTPUT = 572, 388
OUTPUT_START = (INPUT - OUTPUT) // 2
OUTPUT_END = OUTPUT_START + OUTPUT
ARROW_SCALE = 5  # node arrows are drawn this many times their length


def grid_image(size: int = 512, spacing: int = 32, width: int = 3) -> np.ndarray:
    """Dark lines every ``spacing`` pixels on a light background, float32 in [0, 1]."""
    lines = (np.arange(size) % spacing) < width
    return np.where(lines[:, None] | lines[None, :], 0.15, 0.85).astype(np.float32)


def figure(image: np.ndarray, labels: np.ndarray, seed: int) -> Figure:
    """The 3 x 3 panel figure for one ISBI slice (float image, 0/1 labels)."""
    sources = {"grid": grid_image(image.shape[0]), "ISBI 2012 slice": image}
    labels = torch.from_numpy(labels).long()[None]
    still = dict(rotation=False, flip=False, contrast=1.0, brightness=0.0)
    columns = [
        ("cut out, no augmentation", Augmenter(INPUT, OUTPUT, displacement_std=0.0, **still)),
        ("elastic only (3x3 nodes, std 10 px)", Augmenter(INPUT, OUTPUT, **still)),
        ("all of Sec. 3.1", Augmenter(INPUT, OUTPUT)),
    ]
    # One seed for all columns: they share the draws; the first two stay at the slice centre.
    params = [a.draw(1, labels.shape, generator=torch.Generator().manual_seed(seed)) for _, a in columns]
    centre = torch.tensor([[image.shape[0] // 2, image.shape[1] // 2]], dtype=torch.float32)
    params[:2] = [p._replace(centre=centre) for p in params[:2]]

    fig = Figure(figsize=(10.5, 11), layout="constrained")
    axes = fig.subplots(3, 3)
    crop = dict(extent=(OUTPUT_START - 0.5, OUTPUT_END - 0.5, OUTPUT_END - 0.5, OUTPUT_START - 0.5))
    for col, ((title, augmenter), p) in enumerate(zip(columns, params)):
        for row, source in enumerate(sources.values()):
            x, y, _ = augmenter.apply(p, torch.from_numpy(source)[None], labels, torch.ones(labels.shape))
            axes[row, col].imshow(x[0, 0], cmap="gray", vmin=0, vmax=1)
            axes[row, col].add_patch(
                Rectangle((OUTPUT_START - 0.5, OUTPUT_START - 0.5), OUTPUT, OUTPUT, fill=False, ec="gold", ls="--")
            )
        axes[2, col].imshow(y[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", **crop)
        axes[2, col].set(xlim=(-0.5, INPUT - 0.5), ylim=(INPUT - 0.5, -0.5))
        axes[0, col].set_title(title, fontsize=10)
    _draw_nodes(axes[0, 1], params[1].nodes[0])
    axes[2, 2].set_xlabel(
        f"{'flipped, ' if params[2].flip.item() else ''}rotated {math.degrees(params[2].angle.item()):.0f} deg,\n"
        f"contrast x{params[2].contrast.item():.2f}, brightness {params[2].brightness.item():+.2f}",
        fontsize=9,
    )
    for ax, name in zip(axes[:, 0], [*sources, "labels (388x388 output crop)"]):
        ax.set_ylabel(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"Sec. 3.1 augmentation of a {INPUT}x{INPUT} input tile; dashed: the {OUTPUT}x{OUTPUT} output "
        f"(label and weight) crop; arrows: the 3x3 node displacements, {ARROW_SCALE}x",
        fontsize=10,
    )
    return fig


def _draw_nodes(ax, nodes: torch.Tensor) -> None:
    """Arrows from each lattice node towards where it reads the source (tile pixel + displacement)."""
    grid = nodes.shape[-1]
    positions = np.linspace(0, INPUT - 1, grid)
    rows, cols = np.meshgrid(positions, positions, indexing="ij")
    ax.quiver(cols, rows, nodes[1], nodes[0], color="red", angles="xy", scale_units="xy", scale=1 / ARROW_SCALE)
    ax.plot(cols.ravel(), rows.ravel(), "r.", ms=4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.augment_figure", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="ISBI 2012 folder (default: $ISBI2012_DIR, data/isbi2012)")
    parser.add_argument("--out", default="docs/images/augmentation.png", help="PNG to write")
    parser.add_argument("--slice", type=int, default=0, help="training slice to show")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random draws")
    args = parser.parse_args(argv)
    data = load_isbi(args.data_dir)
    labels = (data.train_labels[args.slice] > 0).astype(np.int64)
    fig = figure(image_to_float(data.train_images[args.slice]), labels, args.seed)
    save_figure(fig, args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
