"""Train a fastai image classifier on a folder-per-class dataset and write a run folder.

DATA is either DATA/<class>/<images> (random split) or DATA/train/<class>/... + DATA/valid/<class>/...
(split as given), optionally with DATA/test/<class>/... (or --test-pct) for a held-out test split.
The run folder holds the exported learner (best epoch by validation loss), split.json,
model_meta.json and reports/ (plots and tables). Next step: kimchi-edge convert RUN_DIR.

--gpus N trains in N processes through torchrun (one per GPU; with --device cpu, N CPU processes):
rank 0 screens, reports and writes the run folder. Several machines: start torchrun yourself
(docs/TRAINING.md, "Several GPUs or machines").
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    from kimchi_edge.runtime.cliutil import add_output_args, positive_int
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
    p.add_argument("--max-rotate", type=float, default=10.0, help="aug_transforms max_rotate in degrees (default 10)")
    p.add_argument("--max-warp", type=float, default=0.2, help="aug_transforms max_warp (default 0.2)")
    p.add_argument("--max-lighting", type=float, default=0.2, help="aug_transforms max_lighting (default 0.2)")
    p.add_argument("--resize-method", choices=("crop", "squish"), default="crop")
    p.add_argument("--valid-pct", type=float, default=0.2, help="validation share for a random split (default 0.2)")
    p.add_argument("--test-pct", type=float, default=0.0,
                   help="hold out this share of the images (per class) as a test split that chooses nothing (default 0; "
                        "a DATA/test/ folder does the same)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bs", type=int, default=64,
                   help="batch size per process (default 64); with --gpus N the global batch is N x BS")
    p.add_argument("--epochs", type=int, default=4, help="fine_tune epochs after the frozen ones (default 4)")
    p.add_argument("--freeze-epochs", type=int, default=1,
                   help="frozen-body epochs of fine_tune (default 1; 0: all layers train from the start, one fit_one_cycle)")
    bn = p.add_mutually_exclusive_group()
    bn.add_argument("--train-bn", dest="train_bn", action="store_true", default=None,
                    help="train the pretrained body's BatchNorm layers during fine_tune (fastai's default; the default here for "
                         "the torchvision archs)")
    bn.add_argument("--keep-bn", dest="train_bn", action="store_false", default=None,
                    help="keep them as pretrained through fine_tune (the default for efficientnet_lite0: food10 78.8 %% valid "
                         "instead of 69.6 %%)")
    p.add_argument("--lr-mult", type=float, default=100.0,
                   help="discriminative learning rates: the first layers get lr / LR_MULT (fine_tune's default 100; 1 = one rate)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: lr_find's valley suggestion)")
    p.add_argument("--no-lr-find", dest="lr_find", action="store_false", help="skip lr_find (uses --lr or 2e-3)")
    p.add_argument("--lr-find-iters", type=int, default=None,
                   help="lr_find iterations, at least 7 (default: two epochs' worth of batches, within 30..100)")
    p.add_argument("--one-cycle-epochs", type=int, default=0, help="extra fit_one_cycle epochs after fine_tune")
    p.add_argument("--one-cycle-lr", type=float, default=None, help="lr_max of the extra fit_one_cycle")
    p.add_argument("--early-stop", type=int, default=0, metavar="PATIENCE", help="stop after PATIENCE epochs without a better valid loss")
    p.add_argument("--max-images-per-class", type=int, default=None, help="use at most this many images per class and split")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false", help="GPU: train in fp32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training (default: the cores the load average leaves free, at least 1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0: decode in the main process)")
    p.add_argument("--gpus", type=positive_int, default=1, metavar="N",
                   help="train in N processes through torchrun, one per GPU (NCCL); with --device cpu, N CPU processes "
                        "(gloo) sharing the cores. --bs is per process. Under torchrun / accelerate launch leave it out "
                        "(the launcher's WORLD_SIZE decides). Default 1: this process")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (only once the new one is complete)")
    add_output_args(p, json_help="the run folder and its validation and test metrics")


def run_folder(args: argparse.Namespace) -> Path:
    """``--out``, or ``runs/DATA-ARCH`` without it."""
    return Path(args.out) if args.out else Path("runs") / f"{Path(args.data).resolve().name}-{args.arch}"


def config_from_args(args: argparse.Namespace):
    from kimchi_edge.train.api import TrainConfig

    out = run_folder(args)
    return TrainConfig(
        data=args.data, out=out, arch=args.arch, pretrained=args.pretrained, weights=args.weights,
        item_size=args.item_size, size=args.size, min_scale=args.min_scale, augment=args.augment, flip=args.flip,
        max_rotate=args.max_rotate, max_warp=args.max_warp, max_lighting=args.max_lighting,
        resize_method=args.resize_method, valid_pct=args.valid_pct, test_pct=args.test_pct, seed=args.seed, bs=args.bs,
        epochs=args.epochs,
        freeze_epochs=args.freeze_epochs, train_bn=args.train_bn, lr_mult=args.lr_mult, lr=args.lr, lr_find=args.lr_find, lr_find_iters=args.lr_find_iters,
        one_cycle_epochs=args.one_cycle_epochs, one_cycle_lr=args.one_cycle_lr, early_stop=args.early_stop,
        max_images_per_class=args.max_images_per_class, overwrite=args.overwrite, quiet=args.quiet,
        device=args.device, mixed_precision=args.mixed_precision, threads=args.threads, workers=args.workers,
    )


def result_doc(run_dir: Path) -> dict:
    """The ``--json`` result: the run folder and ``reports/metrics.json`` without the echoed config."""
    from kimchi_edge.runtime.fsutil import read_json

    metrics = read_json(run_dir / "reports" / "metrics.json")
    metrics.pop("config", None)
    return {"run_dir": str(run_dir), **metrics, "next": f"kimchi-edge convert {run_dir}"}


@contextlib.contextmanager
def progress_to_stderr(args: argparse.Namespace):
    """With ``--json``, whatever fastai prints (progress bars) goes to stderr: stdout carries only the JSON."""
    if getattr(args, "json", False):
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


#: options that stay with the launcher and are not passed on to the processes torchrun starts
LAUNCHER_ONLY = ("gpus",)


def train_argv(args: argparse.Namespace) -> list[str]:
    """The ``kimchi-edge train`` arguments that reproduce ``args`` (options left at their default are left out).

    What ``--gpus N`` hands to torchrun: the same options, without ``--gpus``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_args(parser)
    argv: list[str] = []
    for action in parser._actions:
        if action.dest in LAUNCHER_ONLY:
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:
            argv.append(str(value))
            continue
        option = max(action.option_strings, key=len)  # --quiet, not -q
        if action.nargs == 0:  # a flag: given when the value is the one it stores (--train-bn/--keep-bn share a dest)
            if value == action.const:
                argv.append(option)
            continue
        if value != action.default:
            argv += [option, str(value)]
    return argv


def launch_distributed(args: argparse.Namespace) -> int:
    """``--gpus N`` (N > 1) outside a launcher: the cheap checks here, then torchrun runs N training processes."""
    import torch
    from kimchi_edge.runtime.cliutil import progress_log
    from kimchi_edge.runtime.errors import UsageError
    from kimchi_edge.train.api import planned_epochs
    from kimchi_edge.train.distributed import launch, threads_per_process

    config = config_from_args(args)
    if Path(config.out).exists() and not config.overwrite:
        raise UsageError(f"{config.out} already exists; choose another --out or pass --overwrite")
    if planned_epochs(config) == 0:
        raise UsageError("no epochs to train: set --epochs (and/or --freeze-epochs, --one-cycle-epochs)")
    argv = train_argv(args)
    if args.device != "cpu":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus < args.gpus:
            raise UsageError(f"--gpus {args.gpus} but torch sees {n_gpus} CUDA GPU(s); "
                             f"--device cpu runs {args.gpus} CPU processes (gloo) instead")
    if args.out is None:  # every process must name the same folder
        argv += ["--out", str(config.out)]
    return launch(argv, args.gpus, threads=threads_per_process(args.gpus, args.threads), log=progress_log(args))


def run(args: argparse.Namespace) -> int:
    from kimchi_edge.runtime.cliutil import emit, progress_log
    from kimchi_edge.runtime.errors import KimchiEdgeError, require
    from kimchi_edge.runtime.errors import UsageError
    from kimchi_edge.train.distributed import world
    from kimchi_edge.train.third_party import importing_fastai

    # the checks that need neither torch nor fastai, before importing them (seconds on a small CPU)
    out = run_folder(args)
    if not world().distributed and out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; choose another --out or pass --overwrite")
    with importing_fastai():
        require("fastai.vision.all", extra="train", purpose="kimchi-edge train")
    from kimchi_edge.train.api import train

    w = world()
    if args.gpus > 1 and not w.distributed:
        return launch_distributed(args)
    try:
        with progress_to_stderr(args):
            run_dir = train(config_from_args(args), log=progress_log(args))
    except KimchiEdgeError as exc:
        if w.is_rank0:
            raise
        return exc.exit_code  # rank 0 says it once; the other ranks stay silent
    if run_dir is None:  # a rank other than 0: it wrote nothing and prints nothing
        return 0
    emit(args, result_doc(run_dir), (run_dir / "summary.md").read_text(encoding="utf-8"))
    return 0
