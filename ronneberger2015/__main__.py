"""``python -m ronneberger2015 {weightmap,predict,train,evaluate} ...``

Each command lives beside the code it drives (its module's ``cli``); this
module only dispatches and turns bad input into one clear line on stderr.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "weightmap": ("ronneberger2015.weightmap", "boundary weight map of label images (Eq. 2)"),
    "predict": ("ronneberger2015.tiling", "overlap-tile prediction of an image, a stack or a Zarr volume (Fig. 2)"),
    "train": ("ronneberger2015.training", "train the paper's recipe on your own images and labels"),
    "evaluate": ("ronneberger2015.metrics",
                 "ISBI 2012 metrics of a probability map against labels; --measure seg: SEG"),
}


def _dispatch(command: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[command][0])
    if command == "predict":
        from . import volume

        if volume.names_zarr(argv):  # a volume larger than memory, block by block
            module = volume
    try:
        return module.cli(argv, prog=f"python -m ronneberger2015 {command}") or 0
    except (ValueError, OSError, FloatingPointError, ImportError) as error:  # ImportError: a missing optional extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; every file already written is complete", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: python -m ronneberger2015 COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if argv[:1] in ([], ["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return _dispatch(argv[0], argv[1:])


def weightmap() -> int:
    """Console script ``ronneberger2015-weightmap``."""
    return _dispatch("weightmap", sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
