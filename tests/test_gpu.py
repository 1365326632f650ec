"""The prepared GPU command: its dry run writes every file and figure on a machine without imagecodecs, zarr or
dask; the iterations are sized to the budget; a run stopped at the budget keeps its learning curve."""
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import tifffile
import torch
from conftest import synthetic_ctc

from reproduce import gpu

ROOT = Path(__file__).resolve().parent.parent
MEASURES = {"warping_error", "rand_error", "pixel_error", "vrand", "vinfo"}


@pytest.fixture(scope="module")
def prepared(isbi_dir, ctc_dir, tmp_path_factory):
    """The data as ``--prepare`` leaves them for a machine with the checkout only."""
    folder = tmp_path_factory.mktemp("prepared")
    assert gpu.main(["--prepare", "--into", str(folder), "--data-dir", str(isbi_dir), "--ctc-dir", str(ctc_dir)]) == 0
    return folder


def _blocked(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes imagecodecs, zarr and dask look not installed."""
    for name in ("imagecodecs", "zarr", "dask"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ModuleNotFoundError('no {name} here', name='{name}')\n")
    return folder


@pytest.mark.slow
def test_dry_run_writes_every_file_without_imagecodecs_zarr_or_dask(prepared, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_blocked(tmp_path / "blocked")), str(ROOT)])}
    for name in ("ISBI2012_DIR", "CTC_DIR"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "reproduce.gpu", str(out), "--dry-run", "--runs", str(runs),
                             "--data-dir", str(prepared / "isbi2012"), "--ctc-dir", str(prepared / "ctc")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu.FILES)

    results = json.loads((out / "results.json").read_text())
    assert {name: stage["status"] for name, stage in results["stages"].items()} == {
        "machine": "done", "tests": "done", "speed": "done", "table1": "done", "compile": "skipped", "table2": "done"}
    assert results["machine"]["optional_packages"] == {"imagecodecs": False, "zarr": False, "dask": False}
    tests = results["tests"]
    assert tests["errors"] == tests["failures"] == tests["passed"] == 0 and tests["skipped"] >= 4  # no CUDA here
    speed = results["speed"]
    assert {(row["engine"], row["precision"]) for row in speed["train"]["rows"]} == {
        ("plain", "fp32"), ("plain", "bf16"), ("fast", "fp32"), ("fast", "bf16")}
    assert all(row["ms_per_step"] > 0 and row["x_floor"] > 0 for row in speed["train"]["rows"])
    assert len(speed["predict"]["rows"]) == 6 and len(speed["augment"]["rows"]) == 4

    table1 = results["table1"]
    assert table1["plan"]["iterations"] == gpu.TOY["iterations"]
    assert [(run["lr"], run["seed"]) for run in table1["runs"]] == [
        *((lr, 0) for lr in gpu.SWEEP), *((table1["best_lr"], seed) for seed in gpu.BEST_SEEDS)]
    for run in table1["runs"]:
        assert run["status"] == "done" and run["reached"] == gpu.TOY["iterations"]
        assert [point["iteration"] for point in run["curve"]] == [50, 100]
        assert set(run["scores"]) == MEASURES and all(0 <= v <= 1 for v in run["scores"].values())
        assert run["command"].startswith("python -m reproduce.isbi --preset paper --precision bf16")
    assert table1["best_lr"] == max(table1["runs"][: len(gpu.SWEEP)], key=lambda run: run["vrand"])["lr"]
    assert table1["best"]["seeds"] == [0, *gpu.BEST_SEEDS]
    assert [phase["runs"] for phase in table1["phases"]] == [len(gpu.SWEEP), len(gpu.BEST_SEEDS)]
    for run in results["table2"]["runs"]:
        assert run["status"] == "done" and 0 <= run["directions"][0]["seg"] <= 1

    summary = (out / "summary.md").read_text()
    for heading in ("## Machine", "## Tests that need CUDA", "## Speed: train", "## Speed: predict",
                    "## Speed: augment", "## Table 1 at the paper's width", "## Table 2 at the paper's width"):
        assert heading in summary, heading
    assert "| u-net, paper (hidden test set) | - | - | - | 0.000353 | 0.0382 | 0.0611 | 0.97276 | 0.98662 |" in summary
    assert summary in result.stdout  # printed at the end too
    picture = matplotlib.image.imread(out / "learning_curves.png")
    assert picture.ndim == 3 and picture.shape[0] > 500
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert all(not name.endswith((".pt", ".tif")) for name in names)
    for run in table1["runs"]:
        assert f"runs/table1/{run['name']}/held-out/log.csv" in names
    assert "runs/tests.xml" in names and "runs/train.json" in names
    assert (out / "gpu.log").read_text().count("\n") >= 2 * len(gpu.STAGES)


def test_iterations_fit_the_budget():
    """Phases of 3 and then 1 runs: 3 steps of 10 ms plus a 5 s validation every 1000 iterations, then 1 step;
    20 s to start each phase."""
    fit = gpu.fit_iterations
    assert fit(100, [3, 1], 0.01, 5.0, 1000, 20, 10_000) == 1000  # (100 - 40) / 0.05 = 1200 per run
    assert fit(10_000, [3, 1], 0.01, 5.0, 1000, 20, 7000) == 7000  # the cap
    assert fit(60, [3, 1], 0.01, 5.0, 1000, 20, 10_000) == 400  # below one validation: a multiple of 50
    assert fit(30, [3, 1], 0.01, 5.0, 1000, 20, 10_000) == 0
    n = fit(500, [3, 1], 0.0072, 6.0, 1000, 25, 100_000)
    assert sum(gpu.fit_cost(n, k, 0.0072, 6.0, 1000, 25) for k in (3, 1)) <= 500
    assert sum(gpu.fit_cost(n + 1000, k, 0.0072, 6.0, 1000, 25) for k in (3, 1)) > 500


@pytest.mark.slow
def test_a_run_stopped_at_the_budget_keeps_its_learning_curve(isbi_dir, tmp_path):
    """A run still going at its phase's deadline is stopped; its log up to its last checkpoint (every 1000
    iterations) is read back as its learning curve, its last validation as its score."""
    session = gpu.Session(tmp_path / "out", tmp_path / "runs", 600, True, str(isbi_dir), None, [])

    def run(name: str) -> gpu.Run:
        argv = [*gpu._training_options(session, 1), "--held-out-only", "--iterations", "100000",
                "--validate-every", "50", "-o", str(tmp_path / name), "--data-dir", str(isbi_dir)]
        return gpu.Run(name, "isbi", argv, tmp_path / name, {"lr": 3e-4, "seed": 0, "iterations": 100000})

    at_once = run("at-once")
    gpu._wait(session, [at_once], stop_at=time.monotonic())  # the deadline has passed: stopped at the start
    assert gpu._record(at_once)["status"] == "stopped at the budget" and not session.workers

    late = run("late")
    waiting = threading.Thread(target=gpu._wait, args=(session, [late], time.monotonic() + 600))
    waiting.start()
    log, start = tmp_path / "late" / "held-out" / "log.csv", time.monotonic()
    while not log.is_file() and time.monotonic() < start + 300:  # the first checkpoint
        time.sleep(0.5)
    gpu._stop([late.process])  # as _wait does at the deadline
    waiting.join()
    record = gpu._record(late)
    assert record["status"] == "stopped at the budget" and record["reached"] >= 1000
    assert [point["iteration"] for point in record["curve"]][:2] == [50, 100] and record["scores"] is None
    assert record["vrand"] == record["curve"][-1]["vrand"]


def test_bad_invocations_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "summary.md").write_text("earlier")
    with pytest.raises(SystemExit) as stopped:
        gpu.main([str(tmp_path), "--dry-run"])
    assert stopped.value.code == 2 and "already holds summary.md" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").write_text("")
    with pytest.raises(SystemExit):
        gpu.main([str(tmp_path / "new"), "--dry-run", "--runs", str(tmp_path / "runs")])
    assert "give --runs a new folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu.main([str(tmp_path / "new")])
        assert "no CUDA device here: run it on a GPU, or with --dry-run on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_prepare_keeps_what_is_there_and_refuses_frames_that_need_imagecodecs(isbi_dir, tmp_path, capsys):
    source = synthetic_ctc(tmp_path / "source").parent  # LZW-compressed, as the challenge ships them
    target = tmp_path / "data"
    arguments = ["--prepare", "--into", str(target), "--data-dir", str(isbi_dir), "--ctc-dir", str(source)]
    assert gpu.main(arguments) == 0
    frame = target / "ctc" / "PhC-C2DH-U373" / "01" / "t000.tif"
    with tifffile.TiffFile(frame) as tiff:
        assert tiff.pages[0].compression in gpu.READABLE
    np.testing.assert_array_equal(tifffile.imread(frame), tifffile.imread(source / frame.relative_to(target / "ctc")))
    assert gpu.main(arguments) == 0 and "wrote 0 files" in capsys.readouterr().out
    tifffile.imwrite(frame, tifffile.imread(frame), compression="lzw")
    assert gpu.main(arguments) == 2
    assert f"{frame} is LZW-compressed, which needs imagecodecs" in capsys.readouterr().err


def test_a_failed_stage_is_recorded_and_the_next_stages_run(tmp_path, monkeypatch):
    def broken(session):
        raise RuntimeError("no driver")

    monkeypatch.setitem(gpu.STAGE_FUNCTIONS, "machine", broken)
    assert gpu.main([str(tmp_path / "out"), "--dry-run", "--runs", str(tmp_path / "runs"),
                     "--stages", "machine", "compile"]) == 0
    stages = json.loads((tmp_path / "out" / "results.json").read_text())["stages"]
    assert stages["machine"]["status"] == "failed" and stages["machine"]["reason"] == "RuntimeError: no driver"
    assert stages["compile"]["status"] == "skipped"
    assert "RuntimeError: no driver" in (tmp_path / "runs" / "machine-error.log").read_text()
    assert "| machine | failed |" in (tmp_path / "out" / "summary.md").read_text()
