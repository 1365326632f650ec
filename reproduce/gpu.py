"""``python -m reproduce.gpu OUTDIR``: everything a GPU should measure, in one command that fits its budget.

The stages, most valuable first; each writes its figures into OUTDIR the
moment they exist, so a command stopped at its limit keeps what it finished:

1. ``machine``: the GPU, its driver and free memory, torch, CUDA and cuDNN.
2. ``tests``: the tests marked ``cuda`` (skipped on a machine without one).
3. ``speed``: ``python -m reproduce.benchmark train``, ``predict`` and
   ``augment`` (plain baselines in the same process; the floor).
4. ``table1``: Table 1 at the paper's width: the ``paper`` preset on ISBI
   slices 0-19, scored on the held-out slices 20-29, a learning-rate sweep
   (seed 0) with held-out scores every 1,000 iterations, then more seeds of
   the best rate. The iterations are sized from the measured step time so
   the stage fits the budget; the runs of a phase share the GPU at once.
5. ``compile``: the training step with ``torch.compile(mode="reduce-overhead")``
   (CUDA graphs), when time is left.
6. ``table2``: Table 2 at the paper's width (PhC-U373 and DIC-HeLa, one
   direction each), when time is left.

OUTDIR receives at most five files, none in a sub-folder: ``summary.md``
(tables ready for docs/results.md and docs/performance.md, each with its
command), ``results.json`` (every figure), ``learning_curves.png``,
``logs.tar.gz`` (every stage's output and the runs' logs, configurations and
pictures) and ``gpu.log`` (what the command printed). The run folders, with
their checkpoints, stay in ``--runs``.

``--prepare`` copies the data into the checkout's git-ignored ``data/`` in a
form read without imagecodecs (zlib-compressed TIFF); ``--dry-run`` runs every
stage on the CPU at toy size in about a minute. docs/gpu.md gives the commands.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tarfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("machine", "tests", "speed", "table1", "compile", "table2")
FILES = ("summary.md", "results.json", "learning_curves.png", "logs.tar.gz", "gpu.log")
"""What OUTDIR receives: five files, named so that any transfer tool takes them."""
DEFAULT_BUDGET_S = 560
"""Fits one 10-minute command with room for Python's start and the last writes."""
FINISH_S = 10
"""Kept back from the budget for the last summary and archive."""
SWEEP = (1e-4, 3e-4, 1e-3)
"""Learning rates of the sweep (seed 0): the `paper` preset's 3e-4 and a factor of about 3 each way."""
BEST_SEEDS = (1,)
"""Seeds run at the best rate of the sweep, after it."""
VALIDATE_EVERY = 1000
PRECISION = "bf16"
STEP_GUESS_S = 0.010
"""Seconds per training step of the paper's network on a GPU when the speed stage measured none (an H100 took
7.2 ms in bf16 without augmentation)."""
CHECKPOINT_S = 1.0
"""Seconds a run spends on each checkpoint (weights and momentum, 250 MB) beside each validation."""
STARTUP_S = 20.0
"""Seconds a training run needs before its first step (imports, data, weight maps, cuDNN's set-up)."""
CTC_VALIDATION_S = 5.0
"""Seconds of one held-out validation of the Table 2 replay (4 frames, SEG and the ISBI measures)."""
NEEDS = {"tests": 20, "speed": 60, "table1": 120, "compile": 150, "table2": 150}
"""Seconds a stage needs at least on a GPU; with less left it is skipped and says so."""
CAPS = {"tests": 90, "train": 120, "predict": 120, "augment": 60, "compile": 300}
"""Seconds after which a stage's command is stopped."""
TOY = {"base_channels": 2, "depth": 3, "input_tile": 92, "crop": 128, "frames": 3, "iterations": 100,
       "validate_every": 50}
"""The dry run: a 2-channel network of depth 3 on 92 tiles, at most 100 iterations; the ISBI slices cropped to
128 px, 3 cell tracking frames on each side of a direction."""
ISBI_HELD_OUT = 10
"""Slices 20-29, scored by each validation of Table 1."""


class Skip(Exception):
    """A stage that cannot run here or now; the message says why."""


@dataclass
class Session:
    """One invocation: where it writes, its deadline and every figure so far."""

    out: Path
    runs: Path
    budget_s: float
    dry_run: bool
    data_dir: str | None
    ctc_dir: str | None
    argv: list[str]
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)
    workers: list = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left(self) -> float:
        """Seconds until the budget's end, less what the last writes need."""
        return self.budget_s - FINISH_S - (time.monotonic() - self.started)

    def say(self, message: str) -> None:
        """Print ``message`` with the seconds since the start, and append it to gpu.log."""
        line = f"[{time.monotonic() - self.started:6.0f} s] {message}"
        print(line, flush=True)
        with open(self.out / "gpu.log", "a") as log:
            log.write(line + "\n")

    def env(self) -> dict:
        """The environment of every command: the checkout importable without installing it."""
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def command(self, args: list[str], log: Path, timeout: float, **env: str) -> int:
        """Run ``python args`` from the checkout (``env`` added to the environment), its output into ``log``;
        stopped after ``timeout`` s (exit code -9)."""
        with open(log, "w") as output:
            try:
                return subprocess.run([sys.executable, *args], cwd=ROOT, env={**self.env(), **env}, stdout=output,
                                      stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
            except subprocess.TimeoutExpired:
                return -9

    def save(self) -> None:
        """results.json, summary.md and the logs' archive, as they stand."""
        from ronneberger2015 import io

        self.results["seconds"] = time.monotonic() - self.started
        io.write_json(self.out / "results.json", self.results)
        with io.atomic_path(self.out / "summary.md") as tmp:
            tmp.write_text(summary(self.results))
        _archive(self.runs, self.out / "logs.tar.gz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, help=f"where the results go ({', '.join(FILES)})")
    parser.add_argument("--prepare", action="store_true", help="copy the ISBI 2012 and cell tracking data into "
                        "data/ in a form read without imagecodecs, for a machine that has only the checkout")
    parser.add_argument("--into", type=Path, default=ROOT / "data", metavar="DIR",
                        help="with --prepare: the folder that receives isbi2012/ and ctc/ (default: the checkout's "
                             "data/, where the commands look last)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at toy size (about a minute)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole command (default {DEFAULT_BUDGET_S}: one 10-minute command)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"the stages to run, in this order: {', '.join(STAGES)} (default: all)")
    parser.add_argument("--runs", type=Path, help="folder for the run folders and logs (default: runs/gpu-TIME)")
    parser.add_argument("--data-dir", help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    parser.add_argument("--ctc-dir", help="cell tracking folder (default: $CTC_DIR, then data/ctc)")
    args = parser.parse_args(argv)
    if args.prepare:
        if args.outdir is not None:
            parser.error("--prepare copies the data and runs nothing: give it no OUTDIR")
        return prepare(args.data_dir, args.ctc_dir, args.into)
    if args.outdir is None:
        parser.error("give OUTDIR (or --prepare)")
    if args.budget_s < 60:
        parser.error(f"--budget-s {args.budget_s:g} is too short: the stages need a minute at least")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run it on a GPU, or with --dry-run on the CPU")
    taken = [name for name in FILES if (args.outdir / name).exists()]
    if taken:
        parser.error(f"{args.outdir} already holds {', '.join(taken)} of an earlier run; choose an empty OUTDIR")
    runs = args.runs or ROOT / "runs" / time.strftime("gpu-%Y%m%d-%H%M%S")
    if runs.exists() and any(runs.iterdir()):
        parser.error(f"{runs} is not empty: give --runs a new folder")
    args.outdir.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    session = Session(args.outdir, runs, args.budget_s, args.dry_run, args.data_dir, args.ctc_dir,
                      sys.argv[1:] if argv is None else argv)
    session.results = {"command": " ".join(["python -m reproduce.gpu", *session.argv]), "dry_run": args.dry_run,
                       "budget_s": args.budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "runs": str(runs), "stages": {}}
    session.say(f"python -m reproduce.gpu: stages {', '.join(args.stages)}; budget {args.budget_s:.0f} s"
                + ("; DRY RUN on the CPU at toy size" if args.dry_run else ""))
    try:
        for name in (name for name in STAGES if name in args.stages):
            _stage(session, name)
    except KeyboardInterrupt:
        _stop(session.workers)
        for record in session.results["stages"].values():
            if record["status"] == "running":
                record.update(status="interrupted", reason="Ctrl-C")
        session.save()
        session.say(f"interrupted; what was measured is in {args.outdir}")
        return 130
    session.say(f"done; {', '.join(FILES)} in {args.outdir}")
    print("\n" + summary(session.results))
    return 0


def _stage(session: Session, name: str) -> None:
    """Run one stage: its figures, or why it was skipped or failed, go into the results at once."""
    needs = 5 if session.dry_run else NEEDS.get(name, 0)
    record = session.results["stages"][name] = {"status": "running"}
    start = time.monotonic()
    try:
        if session.left() < needs:
            raise Skip(f"needs about {needs} s, {max(session.left(), 0):.0f} s left")
        session.say(f"stage {name} ({session.left():.0f} s left)")
        session.results[name] = STAGE_FUNCTIONS[name](session)
        record["status"] = "done"
    except Skip as reason:
        record.update(status="skipped", reason=str(reason))
    except Exception as error:  # a failed stage is a finding; the later stages still run
        _stop(session.workers)
        record.update(status="failed", reason=f"{type(error).__name__}: {error}")
        (session.runs / f"{name}-error.log").write_text(traceback.format_exc())
    record["seconds"] = time.monotonic() - start
    session.say(f"stage {name}: {record['status']}" + (f" ({record['reason']})" if "reason" in record else "")
                + f" in {record['seconds']:.0f} s")
    session.save()


# ---------------------------------------------------------------------------
# Stages 1-3: the machine, the CUDA tests, the speed


def stage_machine(session: Session) -> dict:
    """The accelerator and the software: what every figure after this one ran on."""
    import torch

    from .record import environment

    device = torch.device(session.device)
    machine = {**environment(device, "reproduce.gpu", session.argv), "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "optional_packages": {name: _importable(name) for name in ("imagecodecs", "zarr", "dask")}}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        machine.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                       multiprocessors=properties.multi_processor_count, memory_total_gib=total / 2**30,
                       memory_free_gib=free / 2**30, driver=_nvidia_smi("driver_version"))
    return machine


def stage_tests(session: Session) -> dict:
    """``pytest -m cuda``: the tests that need a GPU (on the CPU they are all skipped)."""
    report = session.runs / "tests.xml"
    rc = session.command(["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--junitxml", str(report),
                          "--continue-on-collection-errors", "tests"], session.runs / "tests.log",
                         min(CAPS["tests"], session.left()), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if not report.is_file():
        raise RuntimeError(f"pytest ended with {rc} and wrote no report; see tests.log in logs.tar.gz")
    suite = ElementTree.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failures = [{"test": f"{case.get('classname')}::{case.get('name')}",
                 "message": (problem.get("message") or "")[:500]}
                for case in suite.iter("testcase") for problem in case if problem.tag in ("failure", "error")]
    return {"command": "python -m pytest -m cuda tests", "exit_code": rc, **counts,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "problems": failures}


def stage_speed(session: Session) -> dict:
    """The three benchmarks of what a training run and a prediction do, each in its own process."""
    figures = {}
    for name in ("train", "predict", "augment"):
        if session.left() < 10:
            figures[name] = {"skipped": f"{session.left():.0f} s left"}
            continue
        figures[name] = _benchmark(session, name, ["--quick", "--device", "cpu"] if session.dry_run
                                   else ["--device", "cuda"], CAPS[name])
        session.results["speed"] = figures  # each benchmark's figures as soon as they exist
        session.save()
    return figures


def stage_compile(session: Session) -> dict:
    """The training step with the network compiled in "reduce-overhead" mode: CUDA graphs."""
    if session.dry_run:
        raise Skip("the dry run leaves torch.compile out (inductor takes about a minute on a CPU)")
    return _benchmark(session, "train", ["--device", "cuda", "--compile", "reduce-overhead"], CAPS["compile"],
                      log="compile")


def _benchmark(session: Session, name: str, options: list[str], cap: float, log: str | None = None) -> dict:
    figures = session.runs / f"{log or name}.json"
    rc = session.command(["-m", "reproduce.benchmark", name, *options, "--json", str(figures)],
                         session.runs / f"{log or name}.log", min(cap, session.left()))
    if rc != 0 or not figures.is_file():
        return {"failed": f"exit code {rc}" + (" (stopped at its time limit)" if rc == -9 else ""),
                "command": f"python -m reproduce.benchmark {name} {' '.join(options)}"}
    return json.loads(figures.read_text())


# ---------------------------------------------------------------------------
# Stages 4 and 6: Table 1 and Table 2 at the paper's width


@dataclass
class Run:
    """One training run of a replay, in a process of its own."""

    name: str
    module: str  # "isbi" or "ctc"
    argv: list[str]
    folder: Path
    settings: dict
    process: object = None
    started: float = 0.0
    seconds: float = 0.0
    exit_code: int | None = None

    @property
    def command(self) -> str:
        return " ".join([f"python -m reproduce.{self.module}", *self.argv])


def fit_iterations(seconds: float, phases: list[int], step_s: float, validation_s: float, every: int,
                   overhead_s: float, cap: int, granule: int = 50) -> int:
    """The most iterations N per run (at most ``cap``) for which phases of ``phases[i]`` concurrent runs fit
    ``seconds`` one after the other.

    A phase of k runs sharing the GPU is modelled as ``overhead_s + N * (k * step_s + validation_s / every)``:
    the GPU runs one process's kernels at a time, so k runs take k times as long per step, and each run
    stops for its own validation every ``every`` iterations. N is a multiple of ``every`` where it reaches
    it (so the last iteration is validated and scored), else of ``granule``; 0 if none fits.
    """
    per_iteration = sum(k * step_s + validation_s / every for k in phases)
    n = min(cap, int((seconds - overhead_s * len(phases)) / per_iteration)) if per_iteration > 0 else cap
    return max(0, n - n % every if n >= every else n - n % granule)


def fit_cost(iterations: int, runs: int, step_s: float, validation_s: float, every: int, overhead_s: float) -> float:
    """Seconds ``fit_iterations`` predicts for one phase of ``runs`` concurrent runs of ``iterations``."""
    return overhead_s + iterations * (runs * step_s + validation_s / every)


def _validation_seconds(session: Session, truth: np.ndarray) -> float:
    """Seconds one held-out validation of Table 1 takes: the five measures timed on one held-out slice's
    ``truth`` (blurred, with noise: a network early in training), times the ten slices, plus the checkpoint
    beside it."""
    from scipy import ndimage

    from ronneberger2015 import metrics

    if session.dry_run:
        truth = truth[: TOY["crop"], : TOY["crop"]]
    noise = np.random.default_rng(0).normal(0, 0.15, truth.shape)
    proposal = np.clip(ndimage.gaussian_filter((truth > 0).astype(np.float32), 2) + noise, 0, 1)
    start = time.perf_counter()
    metrics.evaluate(proposal[None], truth[None])
    return ISBI_HELD_OUT * (time.perf_counter() - start) + CHECKPOINT_S


def _step_seconds(session: Session) -> tuple[float, str]:
    """Seconds per training step of one run alone, and where the figure comes from."""
    rows = session.results.get("speed", {}).get("train", {}).get("rows", [])
    ours = [row["ms_per_step"] for row in rows if row["engine"] == "fast" and row["precision"] == PRECISION
            and not row["compile"]]
    if ours:
        return ours[0] / 1e3, f"the speed stage's training step ({ours[0]:.2f} ms, {PRECISION})"
    return STEP_GUESS_S, f"a guess ({STEP_GUESS_S * 1e3:.0f} ms): the speed stage measured no step"


def _training_options(session: Session, threads: int) -> list[str]:
    options = ["--preset", "paper", "--precision", PRECISION, "--device", session.device, "--threads", str(threads)]
    if session.dry_run:
        options += [f"--{key.replace('_', '-')}={TOY[key]}" for key in ("base_channels", "depth", "input_tile")]
    return options


def stage_table1(session: Session) -> dict:
    """The sweep (seed 0 at each rate of ``SWEEP``, all at once), then ``BEST_SEEDS`` at the best rate."""
    from ronneberger2015.data import load_isbi

    data = load_isbi(session.data_dir)  # the data are there and verified before any run starts
    every = TOY["validate_every"] if session.dry_run else VALIDATE_EVERY
    cap = TOY["iterations"] if session.dry_run else 10_000
    step_s, step_source = _step_seconds(session)
    validation_s = _validation_seconds(session, data.train_labels[20])
    overhead_s = STARTUP_S + validation_s  # start, and the final scoring with 8-fold TTA
    phases = [len(SWEEP), len(BEST_SEEDS)]
    iterations = fit_iterations(session.left(), phases, step_s, validation_s, every, overhead_s, cap)
    plan = {"step_s": step_s, "step_source": step_source, "validation_s": validation_s, "overhead_s": overhead_s,
            "validate_every": every, "iterations": iterations, "phases": phases, "precision": PRECISION,
            "held_out_slices": [20, 29], "train_slices": [0, 19]}
    result = {"plan": plan, "phases": [], "runs": []}
    session.results["table1"] = result
    if iterations < every:
        raise Skip(f"{session.left():.0f} s hold fewer than {every} iterations at {step_s * 1e3:.1f} ms per step")
    session.say(f"table1: {iterations} iterations per run; step {step_s * 1e3:.2f} ms ({step_source}), "
                f"validation {validation_s:.1f} s")

    def make(lr: float, seed: int, iterations: int) -> Run:
        name = f"lr{lr:.0e}-seed{seed}".replace("e-0", "e-")
        folder = session.runs / "table1" / name
        argv = [*_training_options(session, max(1, (os.cpu_count() or 1) // len(SWEEP))), "--held-out-only",
                "--lr", f"{lr:g}", "--seed", str(seed), "--iterations", str(iterations), "--validate-every",
                str(every), "-o", str(folder), *(["--data-dir", session.data_dir] if session.data_dir else [])]
        return Run(name, "isbi", argv, folder, {"lr": lr, "seed": seed, "iterations": iterations})

    def cost(iterations: int):
        """Seconds the model predicts for a phase of k runs of ``iterations``, as a function of k."""
        return lambda k: fit_cost(iterations, k, step_s, validation_s, every, overhead_s)

    reserve = cost(every)(len(BEST_SEEDS))
    _phase(session, "sweep", [make(lr, 0, iterations) for lr in SWEEP], deadline=session.left() - reserve,
           cost=cost(iterations))
    finished = [run for run in result["runs"] if run.get("vrand") is not None]
    if not finished:
        raise RuntimeError("no run of the sweep reached a validation: " + "; ".join(
            f"{run['name']}: {run.get('error', run['status'])}" for run in result["runs"]))
    best = max(finished, key=lambda run: run["vrand"])
    result["best_lr"] = best["lr"]
    # The second phase, sized again with the first phase's measured time in place of the model's.
    scale = result["phases"][0]["seconds"] / result["phases"][0]["predicted_s"]
    again = fit_iterations(session.left() / scale, [len(BEST_SEEDS)], step_s, validation_s, every, overhead_s,
                           iterations)
    if again < every:
        result["phases"].append({"phase": "seeds", "skipped": f"{session.left():.0f} s left"})
    else:
        _phase(session, "seeds", [make(best["lr"], seed, again) for seed in BEST_SEEDS], deadline=session.left(),
               cost=cost(again))
    result["best"] = _mean_of_best(result)
    return result


def _phase(session: Session, phase: str, runs: list[Run], *, deadline: float, cost) -> None:
    """Start ``runs`` at once, wait until they end or ``deadline`` (seconds left) comes, record each;
    ``cost(k)`` is the model's time for k of them at once (``fit_cost``)."""
    result = session.results["table1" if runs[0].module == "isbi" else "table2"]
    predicted = cost(len(runs))
    start = time.monotonic()
    session.say(f"{phase}: {len(runs)} runs at once, about {predicted:.0f} s; {', '.join(run.name for run in runs)}")
    _wait(session, runs, stop_at=start + max(deadline, 0))
    seconds = time.monotonic() - start
    records = [_record(run) for run in runs]
    reached = sum(record["reached"] for record in records)
    result["phases"].append({"phase": phase, "runs": len(runs), "seconds": seconds, "predicted_s": predicted,
                             "one_after_another_s": len(runs) * cost(1), "iterations_reached": reached,
                             "iterations_per_s": reached / seconds})
    result["runs"] += records
    if runs[0].module == "isbi":
        _learning_curves(session, result["runs"])
    for record in records:
        session.say(f"{phase}: {record['name']} {record['status']} at iteration {record['reached']}"
                    + (f", V_rand {record['vrand']:.4f}" if record.get("vrand") is not None else ""))
    session.save()


def _wait(session: Session, runs: list[Run], stop_at: float) -> None:
    """Start every run in its own process and wait for all; at ``stop_at`` (monotonic) stop those left."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into
    for run in runs:
        run.folder.mkdir(parents=True, exist_ok=True)
        run.process = context.Process(target=_work, args=(run.module, run.argv, str(run.folder / "output.log"),
                                                          session.dry_run), name=run.name)
        run.started = time.monotonic()
        run.process.start()
        session.workers.append(run.process)
    while any(run.process.is_alive() for run in runs) and time.monotonic() < stop_at:
        time.sleep(0.5)
    _stop([run.process for run in runs])
    for run in runs:
        run.exit_code = run.process.exitcode
        run.seconds = time.monotonic() - run.started
        session.workers.remove(run.process)


def _stop(processes: list) -> None:
    """End the processes still running (their last checkpoint and log stay on disk)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def _work(module: str, argv: list[str], log: str, toy: bool) -> None:
    """A run's process: ``python -m reproduce.MODULE ARGV``, its output into ``log``; for the dry run
    (``toy``) on the data made smaller by ``_toy_isbi`` or ``_toy_frames``."""
    import importlib

    os.environ["TQDM_MININTERVAL"] = "10"  # a progress line every 10 s in the log, not every 0.1 s
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    replay = importlib.import_module(f"reproduce.{module}")
    sys.exit(replay.main(argv, reduce={"isbi": _toy_isbi, "ctc": _toy_frames}[module] if toy else None))


def _toy_isbi(data):
    """The dry run's ISBI stacks: every slice cropped to its top-left ``TOY["crop"]`` pixels."""
    return type(data)(*(stack[:, : TOY["crop"], : TOY["crop"]] for stack in data))


def _toy_frames(part):
    """The dry run's cell tracking frames: the first ``TOY["frames"]``, each cropped to ``TOY["crop"]`` pixels
    around the centre of its first cell (sparse cells would leave a fixed window empty)."""
    side, frames = TOY["crop"], slice(TOY["frames"])
    windows = []
    for labels in part.labels[frames]:
        rows, cols = np.nonzero(labels == labels[labels > 0].min())
        top, left = (int(np.clip(np.mean(c) - side // 2, 0, n - side)) for c, n in ((rows, labels.shape[0]),
                                                                               (cols, labels.shape[1])))
        windows.append((slice(top, top + side), slice(left, left + side)))
    return part._replace(frames=part.frames[frames], images=np.stack([i[w] for i, w in zip(part.images, windows)]),
                         labels=np.stack([lab[w] for lab, w in zip(part.labels, windows)]))


def _record(run: Run) -> dict:
    """What a run reached: its status, learning curve and final scores (from its run folder)."""
    from ronneberger2015.io import read_json
    from ronneberger2015.training import read_log

    folder = run.folder / "held-out" if run.module == "isbi" else next(run.folder.glob("train-*"), run.folder)
    rows = read_log(folder / "log.csv")
    status = "done" if run.exit_code == 0 else "stopped at the budget" if run.exit_code in (-15, -9) \
        else f"failed (exit code {run.exit_code})"
    record = {"name": run.name, **run.settings, "status": status, "seconds": run.seconds, "command": run.command,
              "reached": rows[-1]["iteration"] if rows else 0, "folder": str(run.folder)}
    record["curve"] = [{key: row[key] for key in row if key != "learning_rate"} for row in rows if "vrand" in row]
    metrics = read_json(run.folder / "metrics.json") if (run.folder / "metrics.json").is_file() else None
    if run.module == "isbi":
        record["scores"] = metrics["held_out"] if metrics else None
        last = record["scores"] or (record["curve"][-1] if record["curve"] else {})
        record["vrand"] = last.get("vrand")
    else:
        record["directions"] = metrics["directions"] if metrics else None
    if status.startswith("failed"):
        lines = (run.folder / "output.log").read_text(errors="replace").splitlines()
        record["error"] = next((line for line in reversed(lines) if line.startswith("error:")),
                               lines[-1] if lines else "no output")
    return record


def _mean_of_best(result: dict) -> dict | None:
    """The five measures of the runs at the best rate that finished: their mean and half-range."""
    runs = [run for run in result["runs"] if run["lr"] == result["best_lr"] and run["scores"]]
    if not runs:
        return None
    keys = runs[0]["scores"].keys()
    values = {key: [run["scores"][key] for run in runs] for key in keys}
    return {"lr": result["best_lr"], "seeds": [run["seed"] for run in runs],
            "mean": {key: float(np.mean(v)) for key, v in values.items()},
            "half_range": {key: (max(v) - min(v)) / 2 for key, v in values.items()}}


def _learning_curves(session: Session, records: list[dict]) -> None:
    """learning_curves.png: loss and held-out scores of every Table 1 run so far."""
    from ronneberger2015.io import save_figure
    from ronneberger2015.training import read_log

    from .learning_curves import figure

    runs = {f"lr {record['lr']:g}, seed {record['seed']}": read_log(Path(record["folder"]) / "held-out" / "log.csv")
            for record in records}
    runs = {label: rows for label, rows in runs.items() if rows}
    if runs:  # the loss's running mean over 200 iterations, or a tenth of the shortest run
        window = min(200, max(1, min(len(rows) for rows in runs.values()) // 10))
        save_figure(figure(runs, window=window), session.out / "learning_curves.png", dpi=110)


def stage_table2(session: Session) -> dict:
    """Both data sets of Table 2 at once, one direction each, sized to the time left."""
    from ronneberger2015 import ctc
    from ronneberger2015.data import DataError

    names = list(ctc.DATASETS)
    try:
        for name in names:
            ctc.sequences(name, session.ctc_dir)
    except DataError as error:
        raise Skip(f"no cell tracking data: {str(error).splitlines()[0]}") from None
    every = TOY["validate_every"] if session.dry_run else VALIDATE_EVERY
    step_s, step_source = _step_seconds(session)
    overhead_s = STARTUP_S + 2 * CTC_VALIDATION_S  # start; the final scoring with 8-fold TTA and the baseline
    iterations = fit_iterations(session.left(), [len(names)], step_s, CTC_VALIDATION_S, every, overhead_s,
                                TOY["iterations"] if session.dry_run else 10_000)
    result = {"plan": {"iterations": iterations, "step_s": step_s, "step_source": step_source,
                       "validate_every": every, "precision": PRECISION}, "phases": [], "runs": []}
    session.results["table2"] = result
    if iterations < every:
        raise Skip(f"{session.left():.0f} s hold fewer than {every} iterations")
    threads = max(1, (os.cpu_count() or 1) // len(names))
    folders = {name: session.runs / "table2" / name for name in names}
    runs = [Run(name, "ctc", [name, *_training_options(session, threads), "--one-direction", "--iterations",
                              str(iterations), "--validate-every", str(every), "-o", str(folders[name]),
                              *(["--data-dir", session.ctc_dir] if session.ctc_dir else [])],
                folders[name], {"data_set": name, "iterations": iterations}) for name in names]
    _phase(session, "table2", runs, deadline=session.left(),
           cost=lambda k: fit_cost(iterations, k, step_s, CTC_VALIDATION_S, every, overhead_s))
    if not any(run["directions"] or run["curve"] for run in result["runs"]):
        raise RuntimeError("no run of Table 2 reached a validation: " + "; ".join(
            f"{run['name']}: {run.get('error', run['status'])}" for run in result["runs"]))
    return result


STAGE_FUNCTIONS = {"machine": stage_machine, "tests": stage_tests, "speed": stage_speed, "table1": stage_table1,
                   "compile": stage_compile, "table2": stage_table2}


# ---------------------------------------------------------------------------
# What OUTDIR receives


def _archive(runs: Path, path: Path) -> None:
    """logs.tar.gz: every small file under ``runs`` (logs, CSV, JSON, pictures); checkpoints and probability
    maps stay behind."""
    from ronneberger2015.io import atomic_path

    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as archive:
        for file in sorted(runs.rglob("*")):
            if file.is_file() and file.suffix in (".log", ".csv", ".json", ".png", ".xml"):
                archive.add(file, arcname=str(file.relative_to(runs.parent)))


def _number(value, digits: int = 5) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(_number(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows)]


MEASURES = (("warping_error", "warping error"), ("rand_error", "Rand error"), ("pixel_error", "pixel error"),
            ("vrand", "V_rand"), ("vinfo", "V_info"))


def summary(results: dict) -> str:
    """The markdown report: one section per stage, each table with the command that produced it."""
    stages = results.get("stages", {})
    lines = ["# python -m reproduce.gpu", "", f"`{results['command']}`, started {results['started']}, "
             f"{results.get('seconds', 0):.0f} s of a {results['budget_s']:.0f} s budget"
             + (" (**dry run**: CPU, toy sizes; no figure here is a GPU's)" if results["dry_run"] else ""), "",
             *_table(["stage", "status", "seconds", "note"],
                     [[name, s["status"], f"{s.get('seconds', 0):.0f}", s.get("reason", "")]
                      for name, s in stages.items()])]
    machine = results.get("machine")
    if machine:
        lines += ["", "## Machine", "", *_table(["", ""], [[key, str(machine.get(key))] for key in (
            "gpu", "capability", "multiprocessors", "memory_total_gib", "memory_free_gib", "driver", "device_name",
            "cpu_count", "versions", "cuda", "cudnn", "git_commit", "optional_packages") if key in machine])]
    tests = results.get("tests")
    if tests:
        lines += ["", "## Tests that need CUDA", "", f"`{tests['command']}`: {tests['passed']} passed, "
                  f"{tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped", ""]
        lines += [f"- {problem['test']}: {problem['message']}" for problem in tests["problems"]]
    lines += _speed(results.get("speed", {}), results.get("compile"))
    lines += _table1(results.get("table1"))
    lines += _table2(results.get("table2"))
    return "\n".join(lines) + "\n"


def _speed(speed: dict, compiled: dict | None) -> list[str]:
    lines = []
    for name, figures in [*speed.items(), *([("train, compiled", compiled)] if compiled else [])]:
        if "rows" not in figures:
            lines += ["", f"## {name}: {figures.get('failed') or figures.get('skipped')}"]
            continue
        lines += ["", f"## Speed: {name}", "", f"`{figures['command']}` on {figures['device']}"]
        if "step_tflop" in figures:
            lines[-1] += (f"; {figures['step_tflop']:.3g} TFLOP per step, measured peak "
                          f"{figures['peak_tflops']:.3g} TFLOP/s ({figures['peak_dtype']}), floor "
                          f"{figures['floor_ms']:.2f} ms; median of {figures['repeat']}")
            lines += ["", *_table(["method", "precision", "ms/step", "TFLOP/s", "vs plain fp32", "vs plain bf16",
                                   "x floor", "peak GPU GiB"],
                                  [[row["method"] + (f" ({row['compile']})" if row["compile"] else ""),
                                    row["precision"], row["ms_per_step"], row["tflops"], row["vs_plain_fp32"],
                                    row["vs_plain_bf16"], row["x_floor"], row["peak_gpu_gib"]]
                                   for row in figures["rows"]])]
            lines += ["", *_table(["engine, precision", "logits vs float64", "gradients vs float64"],
                                  [[f"{a['engine']}, {a['precision']}", a["logits"], a["gradients"]]
                                   for a in figures["agreement"]])]
        elif "pass_tflop" in figures:
            lines[-1] += (f"; {figures['slices']} slices of 512x512, {figures['pass_tflop']:.3g} TFLOP per pass, "
                          f"floor {figures['floor_ms']:.3g} ms per pass")
            lines += ["", *_table(["method", "precision", "ms/slice", "TFLOP/s", "vs plain fp32", "vs plain bf16",
                                   "x floor", "peak GPU GiB"],
                                  [[row["method"], row["precision"], row["ms_per_slice"], row["tflops"],
                                    row["vs_plain_fp32"], row["vs_plain_bf16"], row["x_floor"], row["peak_gpu_gib"]]
                                   for row in figures["rows"]])]
            lines += ["", *_table(["image", "seconds", "largest forward input", "peak GPU GiB"],
                                  [[f"{s['side']}x{s['side']}", s["seconds"], str(tuple(s["largest_input"])),
                                    s["peak_gpu_gib"]] for s in figures["sizes"]])]
        else:
            lines += ["", *_table(["method", "batch", "ms/tile"],
                                  [[row["method"], row["batch"], row["ms_per_tile"]] for row in figures["rows"]])]
    return lines


def _table1(result: dict | None) -> list[str]:
    if not result or not result.get("runs"):
        return []
    plan = result["plan"]
    lines = ["", "## Table 1 at the paper's width (held-out slices 20-29)", "",
             f"Trained on slices 0-19, {plan['precision']} autocast, validated every {plan['validate_every']} "
             f"iterations; sized from {plan['step_source']} and {plan['validation_s']:.1f} s per validation. "
             "Final scores with 8-fold test-time augmentation; a run stopped at the budget shows its last "
             "validation (no TTA).", ""]
    rows = [[f"lr {run['lr']:g}, seed {run['seed']}", run["reached"], run["status"], f"{run['seconds']:.0f}",
             *[(run["scores"] or (run["curve"][-1] if run["curve"] else {})).get(key) for key, _ in MEASURES]]
            for run in result["runs"]]
    rows.append(["u-net, paper (hidden test set)", "-", "-", "-", 0.000353, 0.0382, 0.0611, 0.97276, 0.98662])
    lines += _table(["run", "iterations", "status", "seconds", *[title for _, title in MEASURES]], rows)
    best = result.get("best")
    if best:
        lines += ["", f"Best rate {best['lr']:g} (by V_rand), seeds {best['seeds']}: mean "
                  + ", ".join(f"{title} {best['mean'][key]:.5g} ± {best['half_range'][key]:.2g}"
                              for key, title in MEASURES)]
    iterations = sorted({point["iteration"] for run in result["runs"] for point in run["curve"]})
    lines += ["", "Learning curves (held-out V_rand, no TTA):", "",
              *_table(["iteration", *[run["name"] for run in result["runs"]]],
                      [[i, *[next((p["vrand"] for p in run["curve"] if p["iteration"] == i), None)
                             for run in result["runs"]]] for i in iterations])]
    lines += ["", "Runs sharing the GPU: the phases' measured time against the model's for the same runs at once "
              "and one after another (`fit_iterations`, from the step time of one run alone):", "",
              *_table(["phase", "runs at once", "seconds", "model: at once", "model: one after another",
                       "iterations/s, all runs"],
                      [[p["phase"], p["runs"], f"{p['seconds']:.0f}", f"{p['predicted_s']:.0f}",
                        f"{p['one_after_another_s']:.0f}", p["iterations_per_s"]]
                       for p in result["phases"] if "seconds" in p])]
    lines += ["", "Commands:", "", *[f"- `{run['command']}`" for run in result["runs"]], *_errors(result)]
    return lines


def _errors(result: dict) -> list[str]:
    """What each failed run printed last."""
    failed = [run for run in result["runs"] if "error" in run]
    return ["", "Failed runs:", "", *[f"- {run['name']}: {run['error']}" for run in failed]] if failed else []


def _table2(result: dict | None) -> list[str]:
    if not result or not result.get("runs"):
        return []
    lines = ["", "## Table 2 at the paper's width (one direction each)", ""]
    rows = []
    for run in result["runs"]:
        for d in run.get("directions") or [{}]:
            rows.append([run["data_set"], d.get("train", "-"), d.get("held_out", "-"), run["reached"], run["status"],
                         d.get("seg"), (d.get("baseline") or {}).get("seg")])
    lines += _table(["data set", "trained on", "scored on", "iterations", "status", "SEG", "Otsu SEG"], rows)
    lines += ["", "u-net, paper (hidden test sets): PhC-U373 0.9203, DIC-HeLa 0.7756", "",
              *[f"- `{run['command']}`" for run in result["runs"]], *_errors(result)]
    return lines


# ---------------------------------------------------------------------------
# Small helpers and --prepare


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _nvidia_smi(query: str) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


READABLE = (1, 8, 32946)
"""TIFF compressions tifffile reads without imagecodecs: none, and zlib (Adobe and the older deflate code)."""


def prepare(data_dir: str | None, ctc_dir: str | None, target: Path) -> int:
    """Copy the ISBI stacks and the cell tracking frames into ``target`` (the checkout's data/ by default) as
    zlib-compressed TIFF, read by tifffile alone, checked pixel for pixel: a machine with only the checkout
    and no imagecodecs then has them. Files already there are kept if their pixels are the same."""
    import tifffile

    from ronneberger2015 import ctc, data, io

    written = []

    def copy(array: np.ndarray, path: Path) -> None:
        if path.exists():
            with tifffile.TiffFile(path) as tiff:
                codec = tiff.pages[0].compression
            if codec not in READABLE:
                raise data.DataError(f"{path} is {codec.name}-compressed, which needs imagecodecs; keep the "
                                     "originals elsewhere (--data-dir, --ctc-dir) and prepare again")
            if not np.array_equal(io.read_image(path), array):
                raise data.DataError(f"{path} exists with other pixels; move it away and prepare again")
            return
        io.write_tiff(path, array, compression="zlib")
        written.append(path)

    try:
        for name, array in zip(data.FILES, data.load_isbi(data_dir)):
            copy(array, target / "isbi2012" / name)
        data.load_isbi(target / "isbi2012")
        source = ctc.data_dir(ctc_dir)
        for name in ctc.DATASETS:
            if not (source / name).is_dir():
                print(f"note: {source / name} not found; the table2 stage will skip {name}")
                continue
            for file in sorted((source / name).rglob("*.tif")):
                copy(io.read_image(file), target / "ctc" / file.relative_to(source))
            for sequence, truth in ctc.sequences(name, target / "ctc"):
                ctc.load(name, sequence, target / "ctc", truth=truth)
    except (data.DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sizes = {folder: _size((target / folder).rglob("*")) for folder in ("isbi2012", "ctc")}
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True).stdout.decode().split("\0")
    total = sum(sizes.values()) + _size(ROOT / name for name in tracked if name)
    print(f"wrote {len(written)} files; {target / 'isbi2012'} {sizes['isbi2012'] / 2**20:.1f} MiB, "
          f"{target / 'ctc'} {sizes['ctc'] / 2**20:.1f} MiB; with the checkout's tracked files "
          f"{total / 2**20:.1f} MiB")
    where = "" if target.resolve() == (ROOT / "data").resolve() else \
        f" --data-dir {target / 'isbi2012'} --ctc-dir {target / 'ctc'}"
    print(f"run it with: PYTHONPATH=. python3 -m reproduce.gpu OUTDIR{where}   (docs/gpu.md)")
    return 0


def _size(paths) -> int:
    """Bytes of the files among ``paths``."""
    return sum(path.stat().st_size for path in paths if path.is_file())


if __name__ == "__main__":
    sys.exit(main())
