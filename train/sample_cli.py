"""Write the built-in sample (scikit-learn's handwritten digits, Korean class names) as a folder per class."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="folder to write <class>/<image>.png into")
    p.add_argument("--per-class", type=int, default=None, help="at most this many images per class (default: all)")


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.train.sample import write_digits_sample

    out = write_digits_sample(args.out, per_class=args.per_class)
    n = sum(1 for _ in out.rglob("*.png"))
    print(f"wrote {n} images in {len(list(out.iterdir()))} class folders to {out}")
    return 0
