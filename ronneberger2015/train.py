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
the host in between. Checkpoints are written atomically; ``resume`` continues
a killed run to the same weights it would have reached; a non-finite loss
stops the run and keeps the last good checkpoint.

Command line: ``python -m ronneberger2015 train IMAGES LABELS -o RUN_DIR``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import io
from .augment import Augmenter
from .loss import weighted_cross_entropy
from .network import UNet, output_size
from .weightmap import target_and_weights

__all__ = ["TrainConfig", "PRESETS", "PRECISIONS", "ENGINES", "COMPILE_MODES", "engine", "train", "training_step",
           "TrainingDiverged", "resolve_device", "cli"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.csv"

PRECISIONS = ("fp32", "bf16")
"""fp32, the reference; or bf16 autocast around the network (weights, gradients, momentum and loss in float32)."""

ENGINES = ("fast", "plain")
"""How a step is executed. "fast": channels_last activations and weights, fused SGD. "plain": torch's
defaults (NCHW, SGD's default kernel), the reference to debug against. Both compute the same step."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes for the network; "reduce-overhead" replays forward and backward as CUDA graphs."""


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run (all written to config.json and the checkpoint).

    The paper fixes momentum 0.99, batch 1, the weight map's w0 = 10 and
    sigma = 5 px, and the elastic deformation (3x3 grid, 10 px); it gives no
    learning rate, schedule or iteration count, so those are our choices
    (docs/training.md gives the reasons). The learning rate is constant,
    Caffe's "fixed" policy. ``precision`` ("fp32" or "bf16" autocast),
    ``engine`` (``ENGINES``) and ``compile`` (None or one of ``COMPILE_MODES``)
    choose how the step runs (docs/performance.md measures them).
    """

    iterations: int = 10_000
    tile: int = 572
    learning_rate: float = 3e-4
    momentum: float = 0.99
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    engine: str = "fast"
    compile: str | None = None
    w0: float = 10.0
    sigma: float = 5.0
    instances: bool | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    network: dict = field(default_factory=lambda: dict(base_channels=64, depth=4, dropout=0.5, variant="paper"))
    augment: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.iterations < 1 or self.log_every < 1 or self.checkpoint_every % self.log_every:
            raise ValueError("iterations and log_every must be >= 1, and checkpoint_every a multiple of log_every")
        output_size(self.tile, self.network.get("depth", 4))  # names the nearest valid tiles


PRESETS = {
    # The paper's setting on a GPU: Fig. 1 network and tile.
    "paper": TrainConfig(),
    # A few minutes on two CPU cores: a narrow network, short schedule. Not the paper's schedule.
    "smoke": TrainConfig(
        iterations=800,
        tile=252,
        learning_rate=3e-4,
        log_every=25,
        checkpoint_every=100,
        network=dict(base_channels=8, depth=4, dropout=0.5, variant="paper"),
    ),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"augment": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["augment"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_log(path: Path, rows: list[list]) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["iteration", "loss", "learning_rate"])
        writer.writerows(rows)


def _read_log(path: Path, up_to: int) -> list[list]:
    if not path.is_file():
        return []
    with open(path, newline="") as source:
        rows = list(csv.reader(source))[1:]
    return [[int(r[0]), float(r[1]), float(r[2])] for r in rows if int(r[0]) <= up_to]


def plot_loss(rows: list[list], path: Path, title: str = "training loss") -> None:
    """Loss curve (per-iteration values and their running mean) as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    iterations = np.array([r[0] for r in rows])
    losses = np.array([r[1] for r in rows])
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axis = figure.subplots()
    axis.plot(iterations, losses, lw=0.5, alpha=0.4, label="per iteration")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(iterations[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    axis.set(xlabel="iteration", ylabel="weighted cross entropy (Eq. 1)", title=title, yscale="log")
    axis.legend()
    io.save_figure(figure, path, dpi=120)


def engine(model: UNet, config: TrainConfig):
    """The network's forward pass and the SGD optimizer (Sec. 3) as ``config`` runs them.

    "fast" moves the model's weights to channels_last (in place, as
    ``Module.to``), feeds it channels_last tiles and updates with the fused
    SGD kernel; "plain" keeps torch's defaults. ``precision`` "bf16" wraps the
    forward pass in bf16 autocast (weights, gradients and momentum stay
    float32); ``compile`` compiles the forward pass (its backward follows).
    Returns ``(forward, optimizer)``; ``forward(x)`` gives the logits.
    """
    fast = config.engine == "fast"
    layout = torch.channels_last if fast else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=fast or None)
    network = torch.compile(model, mode=config.compile) if config.compile else model
    device_type = next(model.parameters()).device.type

    def forward(x: torch.Tensor) -> torch.Tensor:
        if config.compile:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step (for "reduce-overhead")
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            return network(x.contiguous(memory_format=layout))

    return forward, optimizer


def training_step(forward, optimizer, augmenter, stacks, generator) -> torch.Tensor:
    """One iteration (Sec. 3): an augmented tile (Sec. 3.1), forward, Eq. 1, backward, SGD step.

    ``forward`` and ``optimizer`` come from ``engine``; ``stacks`` are the
    (images, targets, weights) on the device. Returns the loss as a device
    tensor, without waiting for it.
    """
    x, y, w = augmenter(*stacks, batch_size=1, generator=generator)
    loss = weighted_cross_entropy(forward(x), y, w)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _prepare(images: np.ndarray, labels: np.ndarray, config: TrainConfig, device: torch.device):
    """Images as float [0, 1], targets and weight maps (Eq. 2, computed once), all on ``device``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 2:
        images, labels = images[None], labels[None]
    if images.ndim != 3 or images.shape != labels.shape:
        raise ValueError(
            f"images and labels must be (H, W) or (Z, H, W) of one shape, got {images.shape} and {labels.shape}"
        )
    target, weight = target_and_weights(labels, w0=config.w0, sigma=config.sigma, instances=config.instances)
    return (
        torch.from_numpy(io.image_to_float(images)).to(device),
        torch.from_numpy(np.ascontiguousarray(target)).long().to(device),
        torch.from_numpy(np.ascontiguousarray(weight)).float().to(device),
    )


def train(
    images: np.ndarray,
    labels: np.ndarray,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
) -> UNet:
    """Train a U-Net on ``images`` (Z, H, W) with ``labels`` (binary or instance ids) and return it.

    ``run_dir`` receives ``checkpoint.pt`` (every ``checkpoint_every``
    iterations and at the end), ``log.csv`` and ``loss.png``. A run folder that
    already holds a checkpoint is continued only with ``resume=True``; the
    continued run reaches the same weights as an uninterrupted one (on the
    CPU; cuDNN's kernels may differ in the last bits).
    """
    config = config or TrainConfig()
    device = resolve_device(device)
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{checkpoint_path} exists: pass --resume to continue that run, or choose another output folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # dropout draws from torch's global generator; it is checkpointed too
    model = UNet(**{"in_channels": 1, "num_classes": 2, **config.network}).to(device)
    forward, optimizer = engine(model, config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    augmenter = Augmenter(config.tile, output_size(config.tile, model.depth), **config.augment)
    images_t, target_t, weight_t = _prepare(images, labels, config, device)

    start, rows = 0, []
    if resume and checkpoint_path.exists():
        checkpoint = io.load_checkpoint(checkpoint_path)
        saved = {k: v for k, v in checkpoint["config"].items() if k != "iterations"}
        mine = {k: v for k, v in dataclasses.asdict(config).items() if k != "iterations"}
        if saved != mine:
            changed = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"{checkpoint_path} was written with other settings ({', '.join(changed)}); "
                             "resume with the same settings or start a new run folder")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"], generator, device)
        start = checkpoint["iteration"]
        rows = _read_log(run_dir / LOG, start)

    def save(iteration: int) -> None:
        io.save_checkpoint(checkpoint_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "config": dataclasses.asdict(config),
            "rng": _rng_state(generator, device),
        })
        _write_log(run_dir / LOG, rows)

    losses = torch.zeros(config.log_every, device=device)
    model.train()
    bar = tqdm(total=config.iterations, initial=start, disable=not progress, unit="it", desc="training", dynamic_ncols=True)
    for iteration in range(start, config.iterations):
        losses[iteration % config.log_every] = training_step(
            forward, optimizer, augmenter, (images_t, target_t, weight_t), generator
        )
        done = iteration + 1
        if done % config.log_every and done != config.iterations:
            bar.update()
            continue
        first = max(start, iteration - iteration % config.log_every)  # this block's first iteration
        recent = losses[first % config.log_every : iteration % config.log_every + 1].tolist()  # one host sync per block
        bad = next((i for i, v in enumerate(recent) if not math.isfinite(v)), None)
        if bad is not None:
            bar.close()
            last = io.load_checkpoint(checkpoint_path)["iteration"] if checkpoint_path.exists() else None
            kept = f"the last good checkpoint ({checkpoint_path}, iteration {last}) is kept" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"the loss became {recent[bad]} at iteration {first + bad + 1}; {kept}. "
                "Lower the learning rate, or train with precision fp32."
            )
        rows += [[first + i + 1, v, config.learning_rate] for i, v in enumerate(recent)]
        bar.set_postfix(loss=f"{float(np.mean(recent)):.4f}")
        bar.update()
        if done % config.checkpoint_every == 0 or done == config.iterations:
            save(done)
    bar.close()
    if rows:
        plot_loss(rows, run_dir / "loss.png")
    return model


def _read_pairs(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels as (Z, H, W) stacks: two TIFF stacks, or two folders of PNG/TIFF files paired by sorted name."""
    def stack(path: Path) -> list[np.ndarray]:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".tif", ".tiff"))
            if not files:
                raise ValueError(f"{path}: no .png, .tif or .tiff files")
            return [io.read_image(p) for p in files]
        array = io.read_image(path)
        return list(array) if array.ndim == 3 else [array]

    images, labels = stack(images_path), stack(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images; give one label image per image")
    shapes = {image.shape for image in images}
    if len(shapes) != 1 or any(i.shape != l.shape for i, l in zip(images, labels)):
        raise ValueError(f"all images and label images must share one (H, W) size, got {sorted(shapes)}; crop or pad them first")
    return np.stack(images), np.stack(labels)


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m ronneberger2015 train IMAGES LABELS -o RUN_DIR``: the paper's recipe on your data."""
    from .metrics import evaluate
    from .tiling import predict

    parser = argparse.ArgumentParser(prog=prog, description="Train the U-Net of the paper (Sec. 3) on your own data.")
    parser.add_argument("images", type=Path, help="TIFF stack, or a folder of PNG/TIFF images")
    parser.add_argument("labels", type=Path, help="TIFF stack or folder of label images (binary, or instance ids)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="run folder (checkpoint, log, loss curve)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="starting settings (default: paper)")
    parser.add_argument("--iterations", type=int, help="number of SGD steps")
    parser.add_argument("--tile", type=int, help="input tile side (a valid size, e.g. 572)")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--seed", type=int, help="run seed")
    parser.add_argument("--precision", choices=PRECISIONS, help="fp32 (reference) or bf16 autocast")
    parser.add_argument("--engine", choices=ENGINES, help="fast (channels_last, fused SGD; default) or plain (torch's defaults)")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the network in this mode (default: not compiled)")
    parser.add_argument("--instances", action="store_true", help="labels are instance ids (0 = background)")
    parser.add_argument("--val", nargs=2, type=Path, metavar=("IMAGES", "LABELS"), help="evaluate on these after training")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    args = parser.parse_args(argv)

    overrides = {"iterations": args.iterations, "tile": args.tile, "learning_rate": args.lr, "seed": args.seed,
                 "precision": args.precision, "engine": args.engine, "compile": args.compile,
                 "instances": True if args.instances else None}
    config = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    images, labels = _read_pairs(args.images, args.labels)
    device = resolve_device(args.device)
    io.write_json(args.out / "config.json", {"preset": args.preset, "device": str(device), **dataclasses.asdict(config)})
    model = train(images, labels, args.out, config, device=device, resume=args.resume)
    print(f"trained {config.iterations} iterations; checkpoint: {args.out / CHECKPOINT}")
    if args.val:
        val_images, val_labels = _read_pairs(*args.val)
        probabilities = predict(model, val_images, device=device, tta=True)[:, 1]
        truth = target_and_weights(val_labels, instances=config.instances)[0]  # separated, as trained on
        scores = evaluate(probabilities, truth)
        io.write_json(args.out / "metrics.json", scores)
        print("\n".join(f"{name:>14}: {value:.6f}" for name, value in scores.items()))
    return 0
