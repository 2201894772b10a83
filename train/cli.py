"""Train a fastai image classifier on a folder-per-class dataset and write a run folder.

DATA is either DATA/<class>/<images> (random split) or DATA/train/<class>/... + DATA/valid/<class>/...
(split as given). The run folder holds the exported learner (best epoch by validation loss),
split.json, model_meta.json and reports/ (plots and tables). Next step: kimchi-edge convert RUN_DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    from kimchi_edge.train.archs_names import ARCHS

    p.add_argument("data", type=Path, help="dataset folder (folder per class, or train/ + valid/)")
    p.add_argument("--out", type=Path, default=None, help="run folder to create (default: runs/<data>-<arch>)")
    p.add_argument("--arch", default="resnet18", choices=ARCHS, help="architecture (default: resnet18)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init (no ImageNet weights)")
    w.add_argument("--weights", metavar="FILE", help="local ImageNet weights file (state dict) instead of downloading")
    p.add_argument("--item-size", type=int, default=460, help="Resize() on each image before batching (default 460)")
    p.add_argument("--size", type=int, default=224, help="model input size after aug_transforms (default 224)")
    p.add_argument("--min-scale", type=float, default=0.75, help="aug_transforms min_scale (default 0.75)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength multiplier; 0 = off (default 1)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (digits, text)")
    p.add_argument("--resize-method", choices=("crop", "squish"), default="crop")
    p.add_argument("--valid-pct", type=float, default=0.2, help="validation share for a random split (default 0.2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bs", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--epochs", type=int, default=4, help="fine_tune epochs after the frozen ones (default 4)")
    p.add_argument("--freeze-epochs", type=int, default=1, help="frozen-body epochs of fine_tune (default 1)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: lr_find's valley suggestion)")
    p.add_argument("--no-lr-find", dest="lr_find", action="store_false", help="skip lr_find (uses --lr or 2e-3)")
    p.add_argument("--lr-find-iters", type=int, default=100)
    p.add_argument("--one-cycle-epochs", type=int, default=0, help="extra fit_one_cycle epochs after fine_tune")
    p.add_argument("--one-cycle-lr", type=float, default=None, help="lr_max of the extra fit_one_cycle")
    p.add_argument("--early-stop", type=int, default=0, metavar="PATIENCE", help="stop after PATIENCE epochs without a better valid loss")
    p.add_argument("--max-images-per-class", type=int, default=None, help="use at most this many images per class and split")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false", help="GPU: train in fp32")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; one line per epoch")


def config_from_args(args: argparse.Namespace):
    from kimchi_edge.train.api import TrainConfig

    out = args.out or Path("runs") / f"{Path(args.data).resolve().name}-{args.arch}"
    return TrainConfig(
        data=args.data, out=out, arch=args.arch, pretrained=args.pretrained, weights=args.weights,
        item_size=args.item_size, size=args.size, min_scale=args.min_scale, augment=args.augment, flip=args.flip,
        resize_method=args.resize_method, valid_pct=args.valid_pct, seed=args.seed, bs=args.bs, epochs=args.epochs,
        freeze_epochs=args.freeze_epochs, lr=args.lr, lr_find=args.lr_find, lr_find_iters=args.lr_find_iters,
        one_cycle_epochs=args.one_cycle_epochs, one_cycle_lr=args.one_cycle_lr, early_stop=args.early_stop,
        max_images_per_class=args.max_images_per_class, overwrite=args.overwrite, quiet=args.quiet,
        device=args.device, mixed_precision=args.mixed_precision, workers=args.workers,
    )


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.errors import require

    require("fastai.vision.all", extra="train", purpose="kimchi-edge train")
    from kimchi_edge.train.api import train

    run_dir = train(config_from_args(args))
    summary = (run_dir / "summary.md").read_text(encoding="utf-8")
    print(summary)
    return 0
