"""``python -m reproduce.isbi``: replay the paper's ISBI 2012 EM experiment (Sec. 4).

Two runs, both into one run folder:

(a) held-out: train on training slices 0-19, predict slices 20-29 with
    overlap-tile prediction averaged over the 8 dihedral transforms, and score
    them with the challenge's five metrics beside the paper's Table 1;
(b) final: train on all 30 training slices, predict ``test-volume.tif`` the
    same way and write the challenge submission (float32 TIFF, 1 = cell
    interior).

The paper's numbers are on the hidden test labels; ours are on held-out
training slices, so the two are comparable in kind, not identical in data.
Without a GPU the ``smoke`` preset runs instead (a narrow network, a few
hundred iterations): it checks the pipeline, and its scores are not the
paper's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ronneberger2015 import io
from ronneberger2015.commandline import renamed, set_threads
from ronneberger2015.data import IsbiData, load_isbi
from ronneberger2015.metrics import evaluate
from ronneberger2015.runtime import resolve_device
from ronneberger2015.tiling import predict
from ronneberger2015.training import TrainingDiverged, add_training_options, config_from_args, train

from .record import device_name, environment

HELD_OUT = slice(20, 30)
TRAIN_HELD_OUT = slice(0, 20)

# Table 1 of the paper (ISBI 2012 leaderboard of March 6th, 2015, hidden test set),
# and U-Net's V_rand / V_info on the later, thinned leaderboard.
PAPER = {
    "u-net (paper, test set)": {"warping_error": 0.000353, "rand_error": 0.0382, "pixel_error": 0.0611,
                                "vrand": 0.97276, "vinfo": 0.98662},
    "human (paper, test set)": {"warping_error": 0.000005, "rand_error": 0.0021, "pixel_error": 0.0010},
}
PRESET_NOTES = {
    "smoke": "NOTE: smoke preset: a narrow network and a short schedule that check the pipeline in minutes. "
             "These are NOT the paper's settings and its scores are not the paper's; run on a GPU for --preset paper.",
    "cpu": "NOTE: cpu preset: the paper's recipe and 572 tiles with a 16-channel network (the paper's: 64), for "
           "machines without a GPU; each of the two training runs (12,000 iterations) takes 45-75 minutes on two "
           "cores (--held-out-only runs one). It is not the paper's network; its held-out scores and how far they "
           "are from the paper's: docs/results.md.",
}

COLUMNS = [("warping_error", "warping error", "{:.6f}"), ("rand_error", "Rand error", "{:.4f}"),
           ("pixel_error", "pixel error", "{:.4f}"), ("vrand", "V_rand", "{:.5f}"), ("vinfo", "V_info", "{:.5f}")]


def table(rows: dict[str, dict]) -> str:
    """A plain-text table of the five metrics, one row per entry ('-' where unknown)."""
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{title:>15}" for _, title, _ in COLUMNS)]
    for name, values in rows.items():
        cells = [fmt.format(values[key]) if key in values else "-" for key, _, fmt in COLUMNS]
        lines.append(name.ljust(width) + "".join(f"{cell:>15}" for cell in cells))
    return "\n".join(lines)


def overlay(image: np.ndarray, truth: np.ndarray, probability: np.ndarray, path: Path, title: str) -> None:
    """image | truth | prediction | errors (red: membrane missed, blue: false membrane) of one slice."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    predicted = probability > 0.5
    errors = np.dstack([image / 255.0] * 3) * 0.6
    errors[predicted & (truth == 0)] = (1.0, 0.1, 0.1)
    errors[~predicted & (truth > 0)] = (0.2, 0.4, 1.0)
    figure = Figure(figsize=(16, 4.4), layout="constrained")
    axes = figure.subplots(1, 4)
    panels = [(image, "image"), (truth, "truth (white: cell)"), (probability, "P(cell interior)"),
              (errors, "errors at 0.5")]
    for axis, (panel, name) in zip(axes, panels):
        axis.imshow(panel, cmap="gray", vmin=0, vmax=panel.max() if panel.ndim == 2 else None)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    io.save_figure(figure, path, dpi=100)


def main(argv: list[str] | None = None, *, reduce: Callable[[IsbiData], IsbiData] | None = None) -> int:
    """The command; ``reduce``, if given, is applied to the stacks read from ``--data-dir`` (the dry run of
    ``python -m reproduce.gpu`` crops them)."""
    parser = argparse.ArgumentParser(prog="python -m reproduce.isbi", description=__doc__.splitlines()[0])
    add_training_options(parser)
    parser.add_argument("-o", "--output", type=Path, help="run folder (default: runs/isbi-PRESET-seedSEED)")
    renamed(parser, "--out", "--output", dest="output", type=Path)
    parser.add_argument("--data-dir", help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --output from their checkpoints")
    parser.add_argument("--held-out-only", action="store_true", help="skip the final run on all 30 slices")
    args = parser.parse_args(argv)
    try:
        return _replay(args, argv, reduce)
    except (TrainingDiverged, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _replay(args: argparse.Namespace, argv: list[str] | None, reduce: Callable | None) -> int:
    set_threads(args.threads, note_if_busy=True)
    device = resolve_device(args.device)
    preset = args.preset or ("paper" if device.type == "cuda" else "smoke")
    config = config_from_args(args, preset)
    if args.seed is None:
        config = dataclasses.replace(config, seed=0)
    out = args.output or Path("runs") / f"isbi-{preset}-seed{config.seed}"
    data = load_isbi(args.data_dir)
    if reduce:
        data = reduce(data)
    print(PRESET_NOTES.get(preset, ""), end="\n" if preset in PRESET_NOTES else "")
    print(f"replaying ISBI 2012 with preset {preset!r} on {device} ({device_name(device)}); run folder {out}")
    record = {"preset": preset, "train": dataclasses.asdict(config), "tta": "8 dihedral transforms",
              "held_out_slices": [HELD_OUT.start, HELD_OUT.stop - 1], **environment(device, "reproduce.isbi", argv)}
    first, last = HELD_OUT.start, HELD_OUT.stop - 1
    timings = {}
    start = time.perf_counter()
    model = train(data.train_images[TRAIN_HELD_OUT], data.train_labels[TRAIN_HELD_OUT], out / "held-out", config,
                  validation=(data.train_images[HELD_OUT], data.train_labels[HELD_OUT]), device=device,
                  resume=args.resume, record=record)
    probabilities = predict(model, data.train_images[HELD_OUT], device=device, tta=True)[:, 1]
    timings["held_out_seconds"] = time.perf_counter() - start
    truth = data.train_labels[HELD_OUT]
    scores = evaluate(probabilities, truth)
    io.write_tiff(out / "held-out" / f"probabilities-{first}-{last}.tif", probabilities.astype(np.float32))
    overlay(data.train_images[first], truth[0], probabilities[0], out / "held-out" / f"overlay-slice{first}.png",
            f"held-out slice {first}, preset {preset}")
    if not args.held_out_only:
        start = time.perf_counter()
        model = train(data.train_images, data.train_labels, out / "final", config, device=device,
                      resume=args.resume, record=record)
        submission = predict(model, data.test_images, device=device, tta=True)[:, 1]
        io.write_tiff(out / "submission.tif", submission.astype(np.float32))
        timings["final_seconds"] = time.perf_counter() - start

    io.write_json(out / "config.json", record)
    io.write_json(out / "metrics.json", {"held_out": scores, "paper": PAPER, "preset": preset, **timings})
    print()
    print(table({f"ours ({preset}, held-out {first}-{last})": scores, **PAPER}))
    print(f"\nThe paper's figures are on the hidden test labels; ours on training slices {first}-{last}, held out "
          "from training, after the last iteration, with 8-fold test-time augmentation.")
    print("Lower is better for the errors, higher for V_rand and V_info. The learning curve (the same slices, "
          f"without augmentation, every {config.validate_every} iterations): {out / 'held-out' / 'loss.png'}")
    print("wall time: " + ", ".join(f"{k.replace('_seconds', '')} {v:.0f} s" for k, v in timings.items()))
    if "final_seconds" in timings:
        print(f"submission (float32, 1 = cell interior): {out / 'submission.tif'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
