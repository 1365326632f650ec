"""``python -m reproduce.isbi``: replay the paper's ISBI 2012 EM experiment (Sec. 4).

Checks the data and the network and prints what the replay will do.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ronneberger2015.data import DataError, load_isbi
from ronneberger2015.network import UNet, output_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.isbi", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="ISBI 2012 folder (default: $ISBI2012_DIR, then data/isbi2012)")
    args = parser.parse_args(argv)
    try:
        data = load_isbi(args.data_dir)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = UNet()
    print(f"ISBI 2012 data verified: {data.train_images.shape[0]} training and {data.test_images.shape[0]} test slices of 512x512")
    print(f"U-Net (Fig. 1): {sum(p.numel() for p in model.parameters()):,} parameters, 572 -> {output_size(572)} px tiles")
    print("device:", "cuda" if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
