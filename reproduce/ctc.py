"""``python -m reproduce.ctc NAME``: replay the paper's cell tracking experiment (Sec. 4, Table 2).

NAME is PhC-C2DH-U373 or DIC-C2DH-HeLa. The challenge's test labels are
hidden, so the replay is a held-out proxy: train on the annotated frames of
one sequence, segment the annotated frames of the other (overlap-tile
prediction, Fig. 2; cells are the 4-connected components of P(cell) > 0.5,
written in the challenge's result format) and score them with the
challenge's SEG measure, the "IOU" of Table 2; then the other way round. Where
only one annotated sequence is present, its annotated frames are split in
time into a first and a second half, used the same two ways. A trivial
baseline is scored on the same frames in the same run: an Otsu threshold per
frame and the 4-connected components, the polarity (cells brighter or darker)
chosen on the training frames.

Weight maps come from the instance labels (Eq. 2, w0 = 10, sigma = 5 px):
touching cells get a one-pixel border that the border term stresses (Fig. 3).
Frames are stretched per frame to [0, 1] before the network sees them (see
``normalise``); unannotated cells of partially annotated frames count as
background. Each choice is measured in docs/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from skimage.filters import threshold_otsu

from ronneberger2015 import ctc, io, metrics
from ronneberger2015.commandline import renamed, set_threads
from ronneberger2015.data import DataError
from ronneberger2015.runtime import resolve_device
from ronneberger2015.segmentation import label_cells
from ronneberger2015.tiling import predict
from ronneberger2015.training import PRESETS as TRAINING
from ronneberger2015.training import TrainConfig, TrainingDiverged, add_training_options, config_from_args, train

from .record import device_name, environment

# Table 2 of the paper: "Segmentation results (IOU) on the ISBI cell tracking challenge 2015" (hidden test sets).
PAPER = {
    "IMCB-SG (2014)": {"PhC-C2DH-U373": 0.2669, "DIC-C2DH-HeLa": 0.2935},
    "KTH-SE (2014)": {"PhC-C2DH-U373": 0.7953, "DIC-C2DH-HeLa": 0.4607},
    "HOUS-US (2014)": {"PhC-C2DH-U373": 0.5323},
    "second-best 2015": {"PhC-C2DH-U373": 0.83, "DIC-C2DH-HeLa": 0.46},
    "u-net (2015)": {"PhC-C2DH-U373": 0.9203, "DIC-C2DH-HeLa": 0.7756},
}

PRESETS = {
    # The paper's network, tile and recipe (Fig. 1, Sec. 3), for a GPU; best.pt by held-out SEG.
    "paper": dataclasses.replace(TRAINING["paper"], select_by="seg", instances=True),
    # A quarter of an hour per direction on a CPU core: an 8-channel network on 316 tiles (132 px out), as many
    # iterations as touching HeLa cells needed to come apart (docs/results.md). Not the paper's schedule.
    "cpu": TrainConfig(iterations=15_000, input_tile=316, learning_rate=3e-4, log_every=25, checkpoint_every=500,
                       validate_every=0, select_by="seg", instances=True,
                       network=dict(base_channels=8, depth=4, dropout=0.5, variant="paper")),
    # A pipeline check of about a minute.
    "smoke": TrainConfig(iterations=200, input_tile=188, learning_rate=3e-4, log_every=25, checkpoint_every=100,
                         validate_every=0, select_by="seg", instances=True,
                         network=dict(base_channels=8, depth=4, dropout=0.5, variant="paper")),
}
PRESET_NOTES = {
    "cpu": "NOTE: cpu preset: an 8-channel network (the paper's: 64) on 316 tiles for 15,000 iterations, about a "
           "quarter of an hour per direction on a CPU core. NOT the paper's schedule; its scores are not the paper's "
           "(docs/results.md).",
    "smoke": "NOTE: smoke preset: a pipeline check of about a minute; its scores say nothing about U-Net.",
}
NORMALISATIONS = ("stretch", "none")
STRETCH = (0.5, 99.5)
"""Percentiles of each frame mapped to 0 and 1 by ``normalise(..., "stretch")``."""
VALIDATION_FRAMES = 4
"""At most this many held-out frames (evenly spaced) are scored during training (the ISBI scores are slow on
large frames); the reported scores use all of them."""


def normalise(frames: np.ndarray, how: str) -> np.ndarray:
    """The frames as the network sees them: "none" as given (uint8 / 255 inside the library, as the 2015
    release read PhC-U373); "stretch" each frame's ``STRETCH`` percentiles mapped to 0 and 1, clipped."""
    if how == "none":
        return frames
    low, high = np.percentile(frames, STRETCH, axis=(1, 2), keepdims=True)
    return np.clip((frames - low) / np.maximum(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def _halves(annotated: ctc.Annotated) -> tuple[ctc.Annotated, ctc.Annotated]:
    """The annotated frames of one sequence split in time into a first and a second half."""
    half = len(annotated.frames) // 2
    if half == 0:
        raise ValueError(f"{annotated} has only one annotated frame: nothing to hold out")
    parts = [slice(None, half), slice(half, None)]
    return tuple(annotated._replace(frames=annotated.frames[part], images=annotated.images[part],
                                    labels=annotated.labels[part]) for part in parts)


def directions(name: str, directory: str | None) -> list[tuple[ctc.Annotated, ctc.Annotated]]:
    """(training, held-out) pairs: sequence 01 -> 02 and 02 -> 01, or the two halves of the only annotated sequence."""
    loaded = [ctc.load(name, sequence, directory, truth=truth) for sequence, truth in ctc.sequences(name, directory)]
    first, second = loaded[:2] if len(loaded) >= 2 else _halves(loaded[0])
    return [(first, second), (second, first)]


def describe(part: ctc.Annotated) -> str:
    """The sequence and its first and last annotated frame used, e.g. '02 t010-t049'."""
    return f"{part.sequence} t{part.frames[0]:03d}-t{part.frames[-1]:03d}"


def otsu_cells(frames: np.ndarray, brighter: bool) -> np.ndarray:
    """The baseline: per frame, cells are the 4-connected components above (or below) its Otsu threshold."""
    masks = [(frame > threshold_otsu(frame)) == brighter for frame in frames]
    return label_cells(np.stack(masks).astype(np.float32))


def baseline(training: ctc.Annotated, held_out: ctc.Annotated) -> dict:
    """SEG and foreground IOU of ``otsu_cells`` on ``held_out``, the polarity chosen by SEG on ``training``."""
    brighter = max((True, False), key=lambda b: metrics.seg(otsu_cells(training.images, b), training.labels))
    cells = otsu_cells(held_out.images, brighter)
    return {"seg": metrics.seg(cells, held_out.labels), "iou": metrics.iou(cells > 0, held_out.labels > 0),
            "cells": "brighter" if brighter else "darker"}


def overlay(image, truth, probability, cells, path: Path, title: str) -> None:
    """image | truth | P(cell) | cells at 0.5, each cell in its own colour."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone
    from skimage.color import label2rgb

    figure = Figure(figsize=(16, 4.4), layout="constrained")
    panels = [(image, "image", "gray"), (label2rgb(truth, bg_label=0), "truth (one colour per cell)", None),
              (probability, "P(cell)", "gray"), (label2rgb(cells, bg_label=0), "cells at 0.5", None)]
    for axis, (panel, name, cmap) in zip(figure.subplots(1, 4), panels):
        axis.imshow(panel, cmap=cmap)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    io.save_figure(figure, path, dpi=100)


def table(name: str, rows: dict[str, dict]) -> str:
    """SEG and foreground IOU per row ('-' where unknown)."""
    width = max(len(row) for row in rows) + 2
    lines = ["".ljust(width) + f"{'SEG':>10}{'IOU':>10}"]
    for row, values in rows.items():
        cells = [f"{values[key]:.4f}" if key in values else "-" for key in ("seg", "iou")]
        lines.append(row.ljust(width) + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, reduce: Callable[[ctc.Annotated], ctc.Annotated] | None = None) -> int:
    """The command; ``reduce``, if given, is applied to each side of a direction before training (the dry run
    of ``python -m reproduce.gpu`` keeps a few frames, cropped)."""
    parser = argparse.ArgumentParser(prog="python -m reproduce.ctc", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=tuple(ctc.DATASETS), help="the data set of Table 2")
    add_training_options(parser, "starting settings: paper (Fig. 1 network, 572 tiles, 8-fold test-time "
                         "augmentation, for a GPU; the default there), cpu (8 channels, 316 tiles, 15,000 iterations, "
                         "about a quarter of an hour per direction on a CPU core; the default without a GPU), smoke (a "
                         "pipeline check); docs/results.md")
    parser.add_argument("-o", "--output", type=Path, help="run folder (default: runs/NAME-PRESET-seedSEED)")
    renamed(parser, "--out", "--output", dest="output", type=Path)
    parser.add_argument("--data-dir", help="folder holding NAME/ in the challenge's layout (default: $CTC_DIR, "
                        "then data/ctc)")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default="stretch",
                        help="stretch (default): each frame's 0.5 and 99.5 percentiles to 0 and 1; none: as read")
    parser.add_argument("--one-direction", action="store_true", help="train and score one way only")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --output from their checkpoints")
    args = parser.parse_args(argv)
    try:
        return _replay(args, argv, reduce)
    except (DataError, TrainingDiverged, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _replay(args: argparse.Namespace, argv: list[str] | None, reduce: Callable | None) -> int:
    set_threads(args.threads, note_if_busy=True)
    device = resolve_device(args.device)
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    config = config_from_args(args, preset, PRESETS)
    pairs = directions(args.name, args.data_dir)[: 1 if args.one_direction else 2]
    if reduce:
        pairs = [(reduce(training), reduce(held_out)) for training, held_out in pairs]
    out = args.output or Path("runs") / f"{args.name}-{preset}-seed{config.seed}"
    tta = preset == "paper"
    print(PRESET_NOTES.get(preset, ""), end="\n" if preset in PRESET_NOTES else "")
    print(f"replaying Table 2 on {args.name} with preset {preset!r} on {device} ({device_name(device)}); "
          f"run folder {out}")
    record = {"preset": preset, "train": dataclasses.asdict(config), "normalise": args.normalise, "threshold": 0.5,
              "tta": "8 dihedral transforms" if tta else "none", **environment(device, "reproduce.ctc", argv)}
    rows, results = {}, []
    for training, held_out in pairs:
        way = f"{describe(training)} -> {describe(held_out)}"
        print(f"\ntrain on {training}, score {held_out}")
        result = _direction(training, held_out, config, args, out, device, tta, record)
        results.append({"train": describe(training), "held_out": describe(held_out), "truth": held_out.truth, **result})
        rows[f"ours ({preset}), {way}"] = result
        rows[f"Otsu + components, {way}"] = result["baseline"]
    summary = {key: float(np.mean([r[key] for r in results])) for key in ("seg", "iou")}
    summary_baseline = {key: float(np.mean([r["baseline"][key] for r in results])) for key in ("seg", "iou")}
    if len(results) > 1:
        rows = {**rows, f"ours ({preset}), mean": summary, "Otsu + components, mean": summary_baseline}
    rows.update({f"{row} (paper, test set)": {"seg": values[args.name]} for row, values in PAPER.items()
                 if args.name in values})
    io.write_json(out / "config.json", record)
    io.write_json(out / "metrics.json", {"name": args.name, "preset": preset, "directions": results, "mean": summary,
                                         "baseline_mean": summary_baseline, "paper": PAPER})
    silver = any(r["truth"] == "ST" for r in results)
    print(f"\n{args.name}: SEG (Table 2's \"IOU\") and foreground IOU on held-out annotated frames"
          + (", scored against SILVER truth (computer-generated), not the manual gold truth" if silver else ""))
    print(table(args.name, rows))
    print("\nThe paper's figures are on the challenge's hidden test sequences; ours on annotated training frames "
          "held out from training, after the last iteration"
          + (", with 8-fold test-time augmentation." if tta else "."))
    print(f"cells: 4-connected components of P(cell) > 0.5, written as maskTTT.tif (uint16) in {out}/NN_RES; "
          "wall time: " + ", ".join(f"{r['train']} -> {r['held_out']} {r['seconds']:.0f} s" for r in results))
    return 0


def _direction(training: ctc.Annotated, held_out: ctc.Annotated, config: TrainConfig, args, out: Path,
               device: torch.device, tta: bool, record: dict) -> dict:
    """Train on ``training``, segment and score ``held_out``; the baseline on the same frames."""
    start = time.perf_counter()
    images = normalise(held_out.images, args.normalise)
    shown = np.unique(np.linspace(0, len(images) - 1, VALIDATION_FRAMES).round().astype(int))
    run = out / f"train-{describe(training).replace(' ', '-')}"
    model = train(normalise(training.images, args.normalise), training.labels, run, config,
                  validation=(images[shown], held_out.labels[shown]), device=device, resume=args.resume,
                  record={**record, "train_frames": list(training.frames), "held_out_frames": list(held_out.frames)})
    probabilities = predict(model, images, device=device, tta=tta)[:, 1]
    cells = label_cells(probabilities)
    ctc.write_masks(out / f"{held_out.sequence}_RES", held_out.frames, cells)
    overlay(held_out.images[0], held_out.labels[0], probabilities[0], cells[0],
            run / f"overlay-t{held_out.frames[0]:03d}.png",
            f"{held_out.name} {held_out.sequence} t{held_out.frames[0]:03d}")
    return {"seg": metrics.seg(cells, held_out.labels), "iou": metrics.iou(probabilities, held_out.labels > 0),
            "baseline": baseline(training, held_out), "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    sys.exit(main())
