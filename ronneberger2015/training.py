"""Training as in Sec. 3: SGD with momentum 0.99 on one large tile at a time.

"we favor large input tiles over a large batch size and hence reduce the batch
to a single image. Accordingly we use a high momentum (0.99) such that a large
number of the previously seen training samples determine the update in the
current optimization step."

The loop: the weight maps (Eq. 2) are computed once; images, targets and
weights move to the device once; each iteration draws one augmented tile
(Sec. 3.1, on the device), runs the network, the weighted soft-max loss
(Eq. 1) and one SGD step; the ``engine`` decides only how that is executed
(memory layout, SGD kernel, compilation), never what is computed. The loss is
read back only every ``log_every`` iterations, so the device never waits on
the host in between. With validation data, held-out scores are computed every
``validate_every`` iterations (``validation``) and the best weights kept as
``best.pt``. Checkpoints are written atomically, and only once their weights
give a finite loss; ``resume`` continues a killed run to the same weights it
would have reached; a non-finite loss stops the run and keeps the last good
checkpoint.

Command line: ``python -m ronneberger2015 train IMAGES LABELS -o RUN_DIR``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import io
from ._version import __version__
from .augment import Augmenter
from .commandline import add_threads, renamed, require, set_threads
from .loss import weighted_cross_entropy
from .network import UNet, current_name, output_size
from .runtime import PRECISIONS, autocast, check_precision, resolve_device
from .tiling import predict
from .validation import SCORES, Validation, diagnose, improves, validate, validation_set
from .weightmap import label_reading, target_and_weights

__all__ = ["TrainConfig", "PRESETS", "ENGINES", "COMPILE_MODES", "RESUMABLE", "forward_and_optimizer", "train",
           "training_step", "TrainingDiverged", "TrainingWarning", "read_log", "plot_loss", "add_training_options",
           "config_from_args"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
LOG = "log.csv"
CONFIG = "config.json"
SUMMARY = "summary.json"

ENGINES = ("fast", "plain")
"""How a step is executed. "fast": channels_last activations and weights, fused SGD. "plain": torch's
defaults (NCHW, SGD's default kernel), the reference to debug against. Both compute the same step."""

LAYOUTS = {"fast": torch.channels_last, "plain": torch.contiguous_format}
"""The memory layout of weights and tiles for each engine."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes for the network; "reduce-overhead" replays forward and backward as CUDA graphs."""

RESUMABLE = ("iterations", "learning_rate", "lr_steps", "validate_every")
"""Settings a resumed run may change (the log records each iteration's learning rate); all others must match."""


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run (all written to config.json and the checkpoint).

    The paper fixes momentum 0.99, batch 1, the weight map's w0 = 10 and
    sigma = 5 px, and the elastic deformation (3x3 grid, 10 px); it gives no
    learning rate, schedule or iteration count, so those are our choices
    (docs/training.md gives the reasons). ``input_tile`` is the side of the
    network's input tile (572 in Fig. 1). The learning rate is
    ``learning_rate``, multiplied by ``lr_gamma`` after each iteration listed
    in ``lr_steps`` (Caffe's "multistep" policy; no steps: its "fixed").
    ``precision`` ("fp32" or "bf16" autocast), ``engine`` (``ENGINES``) and
    ``compile`` (None or one of ``COMPILE_MODES``) choose how the step runs
    (docs/performance.md measures them).
    ``class_balance`` is the weight map's w_c (Eq. 2). With validation data,
    scores are computed every ``validate_every`` iterations (0: at the end
    only) and ``select_by`` (one of ``validation.SCORES``) chooses ``best.pt``.
    """

    iterations: int = 10_000
    input_tile: int = 572
    learning_rate: float = 3e-4
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    momentum: float = 0.99
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    engine: str = "fast"
    compile: str | None = None
    w0: float = 10.0
    sigma: float = 5.0
    class_balance: bool = True
    instances: bool | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    validate_every: int = 1000
    select_by: str = "vrand"
    network: dict = field(default_factory=lambda: dict(base_channels=64, depth=4, dropout=0.5, variant="paper"))
    augment: dict = field(default_factory=dict)

    def __post_init__(self):
        check_precision(self.precision)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.select_by not in SCORES:
            raise ValueError(f"select_by must be one of {tuple(SCORES)}, got {self.select_by!r}")
        if self.iterations < 1 or self.log_every < 1 or self.checkpoint_every % self.log_every \
                or self.validate_every < 0 or self.validate_every % self.log_every:
            raise ValueError("iterations and log_every must be >= 1, and checkpoint_every and validate_every "
                             f"multiples of log_every ({self.log_every})")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        self.lr_steps = tuple(self.lr_steps)  # a list from config.json
        if not all(isinstance(step, int) and step >= 1 for step in self.lr_steps) or not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_steps must be iterations >= 1 and lr_gamma in (0, 1], got {self.lr_steps} and "
                             f"{self.lr_gamma}")
        output_size(self.input_tile, self.network.get("depth", 4))  # names the nearest valid tiles

    def rate_at(self, iteration: int) -> float:
        """The learning rate of step ``iteration`` (1, 2, ...): ``lr_gamma`` once for each step passed."""
        return self.learning_rate * self.lr_gamma ** sum(step < iteration for step in self.lr_steps)


PRESETS = {
    # The paper's setting on a GPU: Fig. 1 network and tile.
    "paper": TrainConfig(),
    # About an hour on two CPU cores: the paper's tile and recipe with a 16-channel network (bf16 autocast);
    # lr and iterations measured (docs/results.md).
    "cpu": TrainConfig(
        iterations=12_000,
        learning_rate=1e-3,
        precision="bf16",
        network=dict(base_channels=16, depth=4, dropout=0.5, variant="paper"),
    ),
    # A few minutes on two CPU cores: a narrow network, short schedule. Not the paper's schedule.
    "smoke": TrainConfig(
        iterations=800,
        input_tile=252,
        learning_rate=3e-4,
        log_every=25,
        checkpoint_every=100,
        validate_every=400,
        network=dict(base_channels=8, depth=4, dropout=0.5, variant="paper"),
    ),
}


class TrainingDiverged(RuntimeError):
    """The loss (or the validation output) became NaN or infinite; the last good checkpoint is kept."""


class TrainingWarning(UserWarning):
    """The run ended but did not learn: its loss did not fall, or its output is near-constant."""


def forward_and_optimizer(model: UNet, config: TrainConfig):
    """The network's forward pass and the SGD optimizer (Sec. 3) as ``config`` runs them.

    "fast" moves the model's weights to channels_last (in place, as
    ``Module.to``), feeds it channels_last tiles and updates with the fused
    SGD kernel; on a GPU it also lets cuDNN time its kernels once per tile
    shape (``torch.backends.cudnn.benchmark``, a global setting that stays
    on). "plain" keeps torch's defaults. ``precision`` "bf16" wraps the
    forward pass in bf16 autocast (weights, gradients and momentum stay
    float32); ``compile`` compiles the forward pass (its backward follows).
    Returns ``(forward, optimizer)``; ``forward(x)`` gives the logits.
    """
    fast = config.engine == "fast"
    layout = LAYOUTS[config.engine]
    model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=fast or None)
    network = torch.compile(model, mode=config.compile) if config.compile else model
    device = next(model.parameters()).device
    if fast and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one tile shape for the whole run

    def forward(x: torch.Tensor) -> torch.Tensor:
        if config.compile:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step (for "reduce-overhead")
        with autocast(device, config.precision):
            return network(x.contiguous(memory_format=layout))

    return forward, optimizer


def training_step(forward, optimizer, augmenter, stacks, generator) -> torch.Tensor:
    """One iteration (Sec. 3): an augmented tile (Sec. 3.1), forward, Eq. 1, backward, SGD step.

    ``forward`` and ``optimizer`` come from ``forward_and_optimizer``; ``stacks`` are the
    (images, targets, weights) on the device. Returns the loss as a device
    tensor, without waiting for it.
    """
    x, y, w = augmenter(*stacks, batch_size=1, generator=generator)
    loss = weighted_cross_entropy(forward(x), y, w)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------
# Inputs


def _stacks(images: np.ndarray, labels: np.ndarray, config: TrainConfig, device: torch.device):
    """Images as float [0, 1], targets and weight maps (Eq. 2, computed once), all on ``device``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 2:
        images, labels = images[None], labels[None]
    if images.ndim != 3 or images.shape != labels.shape:
        raise ValueError(
            f"images and labels must be (H, W) or (Z, H, W) of one shape, got {images.shape} and {labels.shape}"
        )
    target, weight = target_and_weights(labels, w0=config.w0, sigma=config.sigma, instances=config.instances,
                                        class_balance=config.class_balance)
    return (
        torch.from_numpy(io.image_to_float(images)).to(device),
        torch.from_numpy(np.ascontiguousarray(target)).long().to(device),
        torch.from_numpy(np.ascontiguousarray(weight)).float().to(device),
    )


def _validation(validation, config: TrainConfig) -> Validation | None:
    """The validation images, the binary target of their labels and, for instance labels, the ids (scored
    with SEG), read as the training labels are."""
    if validation is None:
        return None
    images, labels = validation
    io.image_to_float(np.asarray(images))  # the same checks as the training images, before any training
    target = target_and_weights(labels, w0=0.0, instances=config.instances, class_balance=False)[0]
    cells = np.asarray(labels) if label_reading(labels, config.instances).instances else None
    if config.select_by == "seg" and cells is None:
        raise ValueError("select_by seg scores cells against their ids: give instance labels (one id per cell) "
                         "for validation, or choose another score")
    return validation_set(images, target, cells)


# ---------------------------------------------------------------------------
# The run folder: config.json, log.csv, checkpoint.pt, best.pt, loss.png, summary.json


def _resume_point(run_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """The checkpoint to continue from (None: a fresh run), after every check and before any write."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        if resume:
            warnings.warn(f"--resume: {path} does not exist, so a new run starts in {run_dir}", TrainingWarning,
                          stacklevel=3)
        return None
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose another output folder")
    try:
        checkpoint = io.load_checkpoint(path)
    except ValueError as error:
        raise ValueError(f"{error}; delete it to start afresh, or put an earlier checkpoint in its place") from error
    saved = {**dataclasses.asdict(TrainConfig()), **checkpoint["config"]}  # settings added later: defaults
    if "tile" in saved:  # the input tile's earlier name
        saved["input_tile"] = saved.pop("tile")
    mine = dataclasses.asdict(config)
    changed = sorted(k for k in mine if k not in RESUMABLE and saved.get(k) != mine[k])
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}); resume with the same "
                         f"settings (only {', '.join(RESUMABLE)} may change) or start a new run folder")
    if checkpoint["iteration"] >= config.iterations:
        raise ValueError(f"{run_dir} has already trained {checkpoint['iteration']} iterations; to continue, give "
                         f"more than {checkpoint['iteration']} iterations")
    return checkpoint


def _write_log(path: Path, rows: list[dict]) -> None:
    columns = ["iteration", "loss", "learning_rate"]
    columns += [name for name in (*SCORES, "output_std") if any(name in row for row in rows)]
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)


def read_log(path: str | Path, up_to: int | None = None) -> list[dict]:
    """The rows of a run's log.csv (up to iteration ``up_to``) as dicts of numbers; blank cells left out."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as source:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(source)]
    for row in rows:
        row["iteration"] = int(row["iteration"])
    return [row for row in rows if up_to is None or row["iteration"] <= up_to]


def plot_loss(rows: list[dict], path: Path, title: str = "training loss") -> None:
    """The loss curve (per-iteration values and their running mean) and, where logged, the validation
    scores below it (the learning curve), as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    iterations = np.array([r["iteration"] for r in rows])
    losses = np.array([r["loss"] for r in rows])
    validated = [r for r in rows if "output_std" in r]
    figure = Figure(figsize=(6, 6 if validated else 3.5), layout="constrained")
    axes = figure.subplots(2 if validated else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(iterations, losses, lw=0.5, alpha=0.4, label="per iteration")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes[0].plot(iterations[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    axes[0].set(ylabel="weighted cross entropy (Eq. 1)", title=title, yscale="log")
    axes[0].legend()
    if validated:
        at = [r["iteration"] for r in validated]
        for name, shown in (("vrand", "V_rand"), ("vinfo", "V_info"), ("rand_error", "1 - Rand error"),
                            ("pixel_error", "1 - pixel error"), ("iou", "foreground IOU"), ("seg", "SEG")):
            if name not in validated[0]:
                continue
            values = [r[name] if SCORES[name] == "higher" else 1 - r[name] for r in validated]
            axes[1].plot(at, values, marker="o", ms=3, label=shown)
        axes[1].set(ylabel="validation score (higher is better)")
        axes[1].legend(fontsize="small")
    axes[-1].set(xlabel="iteration")
    io.save_figure(figure, path, dpi=120)


def _in_model_order(checkpoint: dict, model: UNet) -> dict:
    """The checkpoint's optimizer state, its parameters listed in ``model``'s order.

    torch matches momentum to parameters by position, and version 0.1 listed the
    expansive path's parameters in another order; the checkpoint's weights, saved
    in the order of its time, give each position's name."""
    state = checkpoint["optimizer"]
    (group,) = state["param_groups"]
    names = [name for name, _ in model.named_parameters()]
    saved = [name for name in map(current_name, checkpoint["model"]) if name in names]  # buffers have no momentum
    by_name = dict(zip(saved, group["params"]))
    if len(saved) != len(group["params"]) or sorted(by_name) != sorted(names):
        raise ValueError("the checkpoint's optimizer state does not belong to this network")
    return {**state, "param_groups": [{**group, "params": [by_name[name] for name in names]}]}


@dataclass
class _Run:
    """A training run in progress: its network, optimizer, generator, log rows and best validation score."""

    config: TrainConfig
    device: torch.device
    dir: Path
    model: UNet
    forward: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    augmenter: Augmenter
    stacks: tuple
    rows: list = field(default_factory=list)
    iteration: int = 0
    best: dict | None = None
    seconds: float = 0.0

    def restore(self, checkpoint: dict) -> None:
        """Continue from ``checkpoint``: weights, momentum, both generators, the log up to it, the best score."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(_in_model_order(checkpoint, self.model))
        self.set_rate(checkpoint["iteration"] + 1)  # a resumed run may lower it (RESUMABLE)
        self.generator.set_state(checkpoint["rng"]["augment"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)
        self.iteration = checkpoint["iteration"]
        self.rows = read_log(self.dir / LOG, self.iteration)  # rows logged after the checkpoint are dropped
        self.best = checkpoint.get("best")
        self.seconds = checkpoint.get("seconds", 0.0)

    def set_rate(self, iteration: int) -> None:
        """The learning rate of step ``iteration`` (``TrainConfig.rate_at``) in the optimizer."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.rate_at(iteration)

    def gives_finite_loss(self) -> bool:
        """Whether the weights are finite and give a finite loss (Eq. 1) on a fixed tile, in eval mode.

        The tile comes from its own generator, so the check draws nothing from the run's."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            return False
        fixed = torch.Generator(device=self.device).manual_seed(0)
        x, y, w = self.augmenter(*self.stacks, batch_size=1, generator=fixed)
        self.model.eval()
        try:
            with torch.no_grad():
                return bool(torch.isfinite(weighted_cross_entropy(self.model(x), y, w)))
        finally:
            self.model.train()

    def save(self, started: float) -> None:
        """Log first, then the checkpoint (a kill in between leaves log rows the resume drops)."""
        if not self.gives_finite_loss():
            self.diverged(f"the weights after iteration {self.iteration} give a non-finite loss")
        _write_log(self.dir / LOG, self.rows)
        rng = {"augment": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        io.save_checkpoint(self.dir / CHECKPOINT, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
            "config": dataclasses.asdict(self.config), "rng": rng, "best": self.best,
            "seconds": self.seconds + time.perf_counter() - started,
        })

    def diverged(self, what: str):
        """Stop: write the log up to here (for the curve) and name the checkpoint that is kept."""
        _write_log(self.dir / LOG, self.rows)
        path = self.dir / CHECKPOINT
        last = io.load_checkpoint(path)["iteration"] if path.exists() else None
        kept = (f"the last good checkpoint ({path}, iteration {last}) is kept; continue from it with --resume and a "
                f"lower --lr (now {self.config.learning_rate:g})") if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{what}; {kept}. Or train with precision fp32.")

    def validate(self, validation: Validation) -> None:
        """Score the current weights on ``validation``, log the scores, keep ``best.pt`` if they are the best."""
        try:
            scores = validate(self.model, validation, device=self.device, precision=self.config.precision)
        except FloatingPointError as error:
            self.diverged(f"at iteration {self.iteration} {error}")
        self.model.to(memory_format=LAYOUTS[self.config.engine])  # predict ran channels_last
        self.rows[-1].update(scores)
        name = self.config.select_by
        if improves(scores[name], self.best and self.best["score"], name):
            self.best = {"iteration": self.iteration, "select_by": name, "score": scores[name]}
            io.save_checkpoint(self.dir / BEST, {"model": self.model.state_dict(), "iteration": self.iteration,
                                                 "config": dataclasses.asdict(self.config), "scores": scores})


def _start(run_dir: Path, config: TrainConfig, device: torch.device, stacks: tuple) -> _Run:
    torch.manual_seed(config.seed)  # dropout draws from torch's global generator; it is checkpointed too
    model = UNet(**{"in_channels": 1, "num_classes": 2, **config.network}).to(device)
    forward, optimizer = forward_and_optimizer(model, config)
    return _Run(config, device, run_dir, model, forward, optimizer,
                generator=torch.Generator(device=device).manual_seed(config.seed),
                augmenter=Augmenter(config.input_tile, output_size(config.input_tile, model.depth), **config.augment),
                stacks=stacks)


def _write_config(run: _Run, record: dict | None, resumed: bool) -> None:
    path = run.dir / CONFIG
    previous = io.read_json(path) if resumed and path.is_file() else {}
    entry = {"config": dataclasses.asdict(run.config), "device": str(run.device), "version": __version__,
             "threads": torch.get_num_threads(), **(record or {})}
    if resumed:
        entry = {**previous, "resumed": [*previous.get("resumed", []), {"at_iteration": run.iteration, **entry}]}
    io.write_json(path, entry)


def _note_duration(run: _Run, seconds_per_step: float) -> None:
    """On a CPU, say how long a run will take when it is more than an hour (before most of it is spent)."""
    remaining = (run.config.iterations - run.iteration) * seconds_per_step
    if run.device.type == "cpu" and remaining > 3600:
        tqdm.write(f"note: at {seconds_per_step:.2f} s per iteration on the CPU this run needs about "
                   f"{remaining / 3600:.1f} hours; --preset cpu (a narrower network) fits about an hour, "
                   "--preset smoke a few minutes; the paper's preset wants a GPU", file=sys.stderr)


def _summarise(run: _Run, validation: Validation | None, seconds: float) -> dict:
    """summary.json: the final loss, wall time, best validation score and the warnings of ``diagnose``."""
    scores = {k: v for k, v in run.rows[-1].items() if k in SCORES or k == "output_std"} if validation else None
    if scores:
        spread = scores["output_std"]
    else:  # no validation data: the spread of the output on the first training image
        probabilities = predict(run.model, run.stacks[0][:1].cpu().numpy(), device=run.device)[:, 1]
        run.model.to(memory_format=LAYOUTS[run.config.engine])
        spread = float(probabilities.std())
    losses = [row["loss"] for row in run.rows]
    summary = {"iterations": run.iteration, "final_loss": float(np.mean(losses[-100:])), "seconds": seconds,
               "best": run.best, "final_scores": scores, "output_std": spread, "warnings": diagnose(losses, spread)}
    io.write_json(run.dir / SUMMARY, summary)
    for message in summary["warnings"]:
        warnings.warn(message, TrainingWarning, stacklevel=3)
    return summary


def train(
    images: np.ndarray,
    labels: np.ndarray,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    record: dict | None = None,
) -> UNet:
    """Train a U-Net on ``images`` (Z, H, W) with ``labels`` (binary or instance ids) and return it.

    ``run_dir`` receives ``config.json`` (every setting, plus ``record``),
    ``checkpoint.pt`` (every ``checkpoint_every`` iterations and at the end),
    ``log.csv``, ``loss.png`` and ``summary.json``. ``validation`` = (images,
    labels) held out from training: scored every ``validate_every`` iterations
    and at the end (logged, plotted below the loss), the best weights by
    ``select_by`` kept as ``best.pt``. A run folder that already holds a
    checkpoint is continued only with ``resume=True``; the continued run
    reaches the same weights as an uninterrupted one (on the CPU; cuDNN's
    kernels may differ in the last bits). Every input is checked before
    anything is written. A run that did not learn ends with a
    ``TrainingWarning`` (see ``validation.diagnose``).
    """
    config = config or TrainConfig()
    device = resolve_device(device)
    run_dir = Path(run_dir)
    checkpoint = _resume_point(run_dir, config, resume)
    held_out = _validation(validation, config)
    reading = label_reading(labels, config.instances)
    if reading.empty:
        warnings.warn(f"training slice(s) {reading.empty} have no cell", TrainingWarning, stacklevel=2)
    run = _start(run_dir, config, device, _stacks(images, labels, config, device))
    if checkpoint is not None:
        run.restore(checkpoint)
    for stale in run_dir.glob(".*.part"):  # temporary files of a killed write
        stale.unlink()
    _write_config(run, {"labels": str(reading), "cells": reading.cells, **(record or {})},
                  resumed=checkpoint is not None)
    started = time.perf_counter()
    try:
        _loop(run, held_out, started, progress)
    finally:
        if run.rows:
            plot_loss(run.rows, run_dir / "loss.png")
    _summarise(run, held_out, run.seconds + time.perf_counter() - started)
    return run.model


def _loop(run: _Run, validation: Validation | None, started: float, progress: bool) -> None:
    """The iterations: one step each; every ``log_every`` the losses are read and checked, and where due the
    weights validated and checkpointed."""
    config = run.config
    losses = torch.zeros(config.log_every, device=run.device)
    run.model.train()
    bar = tqdm(total=config.iterations, initial=run.iteration, disable=not progress, unit="it", desc="training",
               dynamic_ncols=True)
    first_step = run.iteration
    with bar:
        for iteration in range(run.iteration, config.iterations):
            if iteration in config.lr_steps:
                run.set_rate(iteration + 1)
            losses[iteration % config.log_every] = training_step(run.forward, run.optimizer, run.augmenter,
                                                                 run.stacks, run.generator)
            run.iteration = done = iteration + 1
            if progress and done == first_step + 3:
                _note_duration(run, (time.perf_counter() - started) / 3)
            if done % config.log_every and done != config.iterations:
                bar.update()
                continue
            first = max(first_step, iteration - iteration % config.log_every)  # this block's first iteration
            recent = losses[first % config.log_every : iteration % config.log_every + 1].tolist()  # one host sync
            bad = next((i for i, v in enumerate(recent) if not math.isfinite(v)), None)
            run.rows += [{"iteration": first + i + 1, "loss": v, "learning_rate": config.rate_at(first + i + 1)}
                         for i, v in enumerate(recent[:bad])]
            if bad is not None:
                run.diverged(f"the loss became {recent[bad]} at iteration {first + bad + 1}")
            bar.set_postfix(loss=f"{float(np.mean(recent)):.4f}")
            bar.update()
            last = done == config.iterations
            if validation is not None and (last or (config.validate_every and done % config.validate_every == 0)):
                run.validate(validation)
                bar.set_postfix(loss=f"{float(np.mean(recent)):.4f}",
                                **{config.select_by: f"{run.rows[-1][config.select_by]:.4f}"})
            if last or done % config.checkpoint_every == 0:
                run.save(started)


# ---------------------------------------------------------------------------
# Command line


def add_training_options(parser: argparse.ArgumentParser, presets_help: str | None = None) -> None:
    """The options that set a ``TrainConfig`` from a preset: shared by ``train`` and the replays (a replay with
    presets of its own, of the same names, describes them in ``presets_help``)."""
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS),
        help=presets_help or "starting settings: paper (Fig. 1 network, 572 tiles, for a GPU), cpu (16 channels, "
             "about an hour on two cores), smoke (8 channels, 252 tiles, minutes); docs/training.md lists each")
    network = parser.add_argument_group("network (Sec. 2)")
    network.add_argument("--base-channels", type=int, metavar="N", help="channels of the first level (paper: 64)")
    network.add_argument("--depth", type=int, metavar="N", help="number of poolings (paper: 4)")
    weights = parser.add_argument_group("weight map (Eq. 2)")
    weights.add_argument("--w0", type=float, help="border weight w0 (paper: 10; 0 turns the border term off)")
    weights.add_argument("--sigma", type=float, help="border width sigma in px (paper: 5)")
    weights.add_argument("--no-class-balance", dest="class_balance", action="store_false", default=None,
                         help="w_c = 1 instead of balancing the class frequencies")
    schedule = parser.add_argument_group("schedule (Sec. 3)")
    schedule.add_argument("--iterations", type=int, help="number of SGD steps")
    schedule.add_argument("--input-tile", type=int, metavar="SIDE", help="input tile side, a valid size (paper: 572)")
    renamed(parser, "--tile", "--input-tile", dest="input_tile", type=int)
    schedule.add_argument("--lr", type=float, help="learning rate")
    schedule.add_argument("--lr-steps", type=int, nargs="*", metavar="N",
                          help="iterations after which the learning rate is multiplied by --lr-gamma (none: constant)")
    schedule.add_argument("--lr-gamma", type=float, help="the factor of each learning-rate step (default 0.1)")
    schedule.add_argument("--seed", type=int, help="run seed")
    schedule.add_argument("--validate-every", type=int, metavar="N", help="iterations between scores on the held-out "
                          "images (default: the preset's, 1000 for paper and cpu; 0: at the end only)")
    execution = parser.add_argument_group("execution")
    execution.add_argument("--precision", choices=PRECISIONS, help="fp32 (reference) or bf16 autocast")
    execution.add_argument("--engine", choices=ENGINES,
                           help="fast (channels_last, fused SGD) or plain (torch's defaults)")
    execution.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the network in this mode")
    execution.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_threads(execution)


def config_from_args(args: argparse.Namespace, preset: str, presets: dict[str, TrainConfig] = PRESETS) -> TrainConfig:
    """``presets[preset]`` with the options of ``add_training_options`` that were given."""
    base = presets[preset]
    network = {**base.network, **{k: v for k, v in (("base_channels", args.base_channels), ("depth", args.depth))
                                  if v is not None}}
    overrides = {"iterations": args.iterations, "input_tile": args.input_tile, "learning_rate": args.lr,
                 "lr_steps": args.lr_steps, "lr_gamma": args.lr_gamma, "seed": args.seed,
                 "validate_every": args.validate_every,
                 "precision": args.precision, "engine": args.engine, "compile": args.compile, "w0": args.w0,
                 "sigma": args.sigma, "class_balance": args.class_balance, "network": network}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels as (Z, H, W) stacks, one label image per image, of one size."""
    (images, _), (labels, _) = io.read_images(images_path), io.read_images(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images; give one label image per image")
    if images.shape != labels.shape:
        raise ValueError(f"images {images_path} ({images.shape[1]}x{images.shape[2]}) and labels {labels_path} "
                         f"({labels.shape[1]}x{labels.shape[2]}) differ in size; crop or pad them to one size")
    return images, labels


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m ronneberger2015 train IMAGES LABELS -o RUN_DIR``: the paper's recipe on your data."""
    parser = argparse.ArgumentParser(prog=prog, description="Train the U-Net of the paper (Sec. 3) on your own "
                                     "data; docs/training.md, 'Training on your own data', walks through it.")
    parser.add_argument("images", type=Path, help="TIFF stack, one image, or a folder of TIFF/PNG/GIF images")
    parser.add_argument("labels", type=Path, help="the same for the labels: 0 = background, nonzero = cell "
                        "(a binary mask, or instance ids where cells touch)")
    parser.add_argument("-o", "--output", type=Path, metavar="RUN_DIR",
                        help="run folder: config, log, loss curve, checkpoint.pt, best.pt, summary")
    renamed(parser, "--out", "--output", dest="output", type=Path)
    reading = parser.add_mutually_exclusive_group()
    reading.add_argument("--instances", action="store_const", const=True, dest="instances",
                         help="read the labels as cell ids even if they hold one nonzero value")
    reading.add_argument("--binary", action="store_const", const=False, dest="instances",
                         help="read the labels as a mask (nonzero = cell) even if they hold several values")
    add_training_options(parser)
    validation = parser.add_argument_group("validation")
    validation.add_argument("--val", nargs=2, type=Path, metavar=("IMAGES", "LABELS"),
                            help="held-out images and labels, scored during training (log.csv, loss.png)")
    validation.add_argument("--select-by", choices=sorted(SCORES), help="the validation score that chooses best.pt "
                            "(default vrand; seg needs instance labels)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint; "
                        "--iterations and --lr may change")
    args = parser.parse_args(argv)
    require(parser, args, "output", "-o/--output")
    set_threads(args.threads, note_if_busy=True)
    config = config_from_args(args, args.preset or "paper")
    extra = {"instances": args.instances, "select_by": args.select_by}
    config = dataclasses.replace(config, **{k: v for k, v in extra.items() if v is not None})
    device = resolve_device(args.device)
    images, labels = _read_pair(args.images, args.labels)
    held_out = _read_pair(*args.val) if args.val else None
    print(label_reading(labels, config.instances))
    record = {"preset": args.preset or "paper", "command": " ".join([prog or "train", *(argv or sys.argv[1:])]),
              "inputs": {"images": str(args.images), "labels": str(args.labels),
                         "val": [str(p) for p in args.val] if args.val else None}}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrainingWarning)
            train(images, labels, args.output, config, validation=held_out, device=device, resume=args.resume,
                  record=record)
    except TrainingDiverged as error:
        raise ValueError(f"training stopped: {error}") from None
    except KeyboardInterrupt:
        path = args.output / CHECKPOINT
        kept = f"the checkpoint of iteration {io.load_checkpoint(path)['iteration']} is kept" if path.exists() \
            else "no checkpoint was written yet"
        print(f"\ninterrupted; {kept}. Continue with the same command and --resume.", file=sys.stderr)
        return 130
    summary = io.read_json(args.output / SUMMARY)
    print(f"trained {summary['iterations']} iterations in {summary['seconds'] / 60:.1f} min; final loss "
          f"{summary['final_loss']:.4f}; checkpoint: {args.output / CHECKPOINT}")
    if summary["final_scores"]:
        best = summary["best"]
        print(f"best {best['select_by']} {best['score']:.4f} at iteration {best['iteration']}: {args.output / BEST}")
        io.write_json(args.output / "metrics.json", summary["final_scores"])
        print("\n".join(f"{name:>14}: {value:.6f}" for name, value in summary["final_scores"].items()))
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return 0
