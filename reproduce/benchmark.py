"""``python -m reproduce.benchmark {weightmap,augment,predict,metrics,train}``

Each benchmark times our code against a plain baseline run in the same
process and prints the ratio; figures recorded in docs/performance.md come
from these commands. Speed is never asserted in the test suite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable


def timeit(function: Callable[[], object], *, repeat: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``function()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# BENCHMARKS: one function per subcommand, each taking the parsed arguments.


def bench_weightmap(args: argparse.Namespace) -> None:
    raise NotImplementedError("weightmap benchmark")


def bench_augment(args: argparse.Namespace) -> None:
    raise NotImplementedError("augment benchmark")


def bench_predict(args: argparse.Namespace) -> None:
    raise NotImplementedError("predict benchmark")


def bench_metrics(args: argparse.Namespace) -> None:
    raise NotImplementedError("metrics benchmark")


def bench_train(args: argparse.Namespace) -> None:
    raise NotImplementedError("train benchmark")


BENCHMARKS = {
    "weightmap": bench_weightmap,
    "augment": bench_augment,
    "predict": bench_predict,
    "metrics": bench_metrics,
    "train": bench_train,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(BENCHMARKS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--data-dir", default=None, help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (seconds, for CI)")
    args = parser.parse_args(argv)
    BENCHMARKS[args.which](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
