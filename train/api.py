"""The training stage as a function: data folder -> run folder (see docs/DESIGN.md)."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kimchi_edge.runtime.errors import DataError, UsageError
from kimchi_edge.runtime.fsutil import atomic_directory, atomic_write_json
from kimchi_edge.runtime.manifest import MODEL_META_NAME, ModelMeta, to_dict

LEARNER_NAME = "learner.pkl"
SPLIT_NAME = "split.json"


@dataclass
class TrainConfig:
    """Everything a training run needs; every field is a CLI option of ``kimchi-edge train``."""

    data: Path
    out: Path
    arch: str = "resnet18"
    pretrained: bool = True
    weights: str | None = None
    item_size: int = 460
    size: int = 224
    min_scale: float = 0.75
    augment: float = 1.0
    flip: bool = True
    resize_method: str = "crop"
    valid_pct: float = 0.2
    seed: int = 42
    bs: int = 64
    epochs: int = 4
    freeze_epochs: int = 1
    lr: float | None = None  # None: lr_find's suggestion
    lr_find: bool = True
    lr_find_iters: int = 100
    one_cycle_epochs: int = 0
    one_cycle_lr: float | None = None
    early_stop: int = 0  # patience in epochs, 0 = off
    max_images_per_class: int | None = None
    overwrite: bool = False
    quiet: bool = False
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: bool = True  # on GPU only
    workers: int = 0
    top_losses: int = 9


def _versions() -> dict[str, str]:
    import fastai
    import torch
    import torchvision

    out = {"fastai": fastai.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def _subsample(items: list, per_class: int | None, seed: int) -> list:
    if per_class is None:
        return items
    import random

    rng = random.Random(seed)
    by: dict[str, list] = {}
    for it in items:
        by.setdefault(it[1], []).append(it)
    out = []
    for lab in sorted(by):
        group = by[lab]
        rng.shuffle(group)
        out += sorted(group[:per_class])
    return out


def _make_history_cb():
    from fastai.callback.core import Callback

    class History(Callback):
        """Keeps one row per epoch across fine_tune's two fits and fit_one_cycle."""

        order = 60  # after Recorder

        def __init__(self, quiet: bool):
            self.rows: list[dict[str, Any]] = []
            self.phases: list[str] = []
            self.phase = ""
            self.quiet = quiet

        def before_fit(self):
            self.phase = self.phases.pop(0) if self.phases else "fit"

        def after_epoch(self):
            rec = self.learn.recorder
            names = [n for n in rec.metric_names[1:-1]]  # drop 'epoch' and 'time'
            vals = rec.values[-1] if rec.values else []
            row: dict[str, Any] = {"epoch": len(self.rows), "phase": self.phase}
            for n, v in zip(names, vals):
                row[n] = float(v) if v is not None else None
            self.rows.append(row)
            if self.quiet:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
                print(f"epoch {row['epoch']} ({self.phase}): {shown}", flush=True)

    return History


def train(config: TrainConfig) -> Path:
    """Train, pick the best epoch by validation loss, export, and write reports.

    The run folder is built under a temporary name and renamed at the end, so an interrupted run never
    leaves a ``learner.pkl`` that looks complete.

    Returns:
        The run folder.

    Raises:
        DataError: unusable data (exit code 2, nothing written).
        UsageError: bad options (exit code 2, nothing written).
    """
    t_start = time.time()
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise UsageError(f"{out} already exists; choose another --out or pass --overwrite")
    # everything that can be checked without heavy imports happens before anything is written
    from .data import scan_dataset

    scan = scan_dataset(config.data)
    scan.train = _subsample(scan.train, config.max_images_per_class, config.seed)
    scan.valid = _subsample(scan.valid, config.max_images_per_class, config.seed)

    import torch
    from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
    from fastai.vision.all import Precision, Recall, accuracy, error_rate, minimum, set_seed, steep, valley

    from . import reports as rep
    from .archs import learner_for_arch
    from .data import make_dataloaders
    from .spec import compare_with_fastai, preprocessing_from_dls

    rep.setup_matplotlib()
    use_cuda = torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA GPU")
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

    set_seed(config.seed)  # split, head init and batch order: the same run gives the same learner

    with atomic_directory(out, overwrite=config.overwrite) as run:
        reports = run / "reports"
        reports.mkdir()
        dls = make_dataloaders(
            scan, item_size=config.item_size, size=config.size, min_scale=config.min_scale, augment=config.augment,
            flip=config.flip, resize_method=config.resize_method, valid_pct=config.valid_pct, seed=config.seed, bs=config.bs,
            num_workers=config.workers, device=device,
        )
        metrics = [accuracy, error_rate, Recall(average="macro"), Precision(average="macro")]
        learn, weights_source = learner_for_arch(
            dls, config.arch, pretrained=config.pretrained, weights=config.weights, metrics=metrics, path=run
        )
        if use_cuda and config.mixed_precision:
            learn.to_channelslast()  # channels_last + mixed precision (fastai's ChannelsLast/MixedPrecision)
        quiet = config.quiet or not sys.stdout.isatty()
        if quiet:
            from fastai.callback.progress import ProgressCallback
            from fastcore.basics import noop

            learn.remove_cb(ProgressCallback)
            learn.logger = noop  # History prints one readable line per epoch instead

        # what the runtime will do, read from the pipeline and proven on real validation files
        spec = preprocessing_from_dls(learn.dls)
        probe = [f for f in list(learn.dls.valid_ds.items)[:4]]
        diff = compare_with_fastai(learn.dls, spec, probe)
        if diff > (0.51 if spec.dtype == "uint8" else 0.01):
            raise DataError(f"runtime preprocessing differs from fastai's by {diff:.2f}/255 on {probe[0]}; please report this")

        lr_info: dict[str, float] = {}
        lr = config.lr
        if config.lr_find and lr is None:
            sug = learn.lr_find(suggest_funcs=(minimum, steep, valley), show_plot=True, num_it=config.lr_find_iters)
            rep.save_current_figure(reports / "lr_find.png")
            lr_info = {k: float(v) for k, v in sug._asdict().items()}
            lr = lr_info.get("valley") or 2e-3
        lr = float(lr or 2e-3)

        history_cb = _make_history_cb()(quiet)
        saver = SaveModelCallback(monitor="valid_loss", fname="best", with_opt=False, reset_on_fit=False)
        cbs: list[Any] = [saver]
        if config.early_stop:
            cbs.append(EarlyStoppingCallback(monitor="valid_loss", patience=config.early_stop, reset_on_fit=False))
        learn.add_cb(history_cb)
        schedule = []
        if config.pretrained or config.weights:
            history_cb.phases = ["frozen", "unfrozen"]
            learn.fine_tune(config.epochs, base_lr=lr, freeze_epochs=config.freeze_epochs, cbs=cbs)
            schedule.append(f"fine_tune({config.epochs}, base_lr={lr:.1e}, freeze_epochs={config.freeze_epochs})")
        elif config.epochs:
            history_cb.phases = ["scratch"]
            learn.fit_one_cycle(config.epochs, lr, cbs=cbs)
            schedule.append(f"fit_one_cycle({config.epochs}, {lr:.1e}) from scratch")
        if config.one_cycle_epochs:
            history_cb.phases = ["one_cycle"]
            lr_max = config.one_cycle_lr or lr / 10
            learn.fit_one_cycle(config.one_cycle_epochs, slice(lr_max / 10, lr_max), cbs=cbs)
            schedule.append(f"fit_one_cycle({config.one_cycle_epochs}, lr_max={lr_max:.1e})")
        learn.remove_cb(history_cb)
        history = history_cb.rows
        if not history:
            raise UsageError("no epochs to train: set --epochs (and/or --freeze-epochs, --one-cycle-epochs)")
        best_epoch = min(range(len(history)), key=lambda i: (history[i]["valid_loss"], i))

        # saver has loaded the best weights at the end of each fit; measure them
        if use_cuda and config.mixed_precision:
            learn.to_contiguous(to_fp32=True)
        vals = learn.validate()
        names = ["valid_loss", "accuracy", "error_rate", "recall_macro", "precision_macro"]
        final = {n: float(v) for n, v in zip(names, vals)}

        rep.interpretation(learn, reports, top_losses=config.top_losses)
        rep.write_history(reports, history)
        rep.plot_history(reports, history, best_epoch)

        learn.remove_cbs([c for c in learn.cbs if type(c).__name__ in ("SaveModelCallback", "EarlyStoppingCallback")])
        (run / "models" / "best.pth").unlink(missing_ok=True)
        try:
            (run / "models").rmdir()
        except OSError:
            pass
        learn.path = run
        learn.export(LEARNER_NAME)

        vocab = [str(v) for v in learn.dls.vocab]
        meta = ModelMeta(labels=tuple(vocab), architecture=config.arch, preprocessing=spec, pretrained=weights_source,
                         framework=_versions())
        atomic_write_json(run / MODEL_META_NAME, to_dict(meta))

        def entries(items) -> list[dict[str, str]]:
            return [{"file": scan.relative(Path(f)), "label": labels_by_file[Path(f)]} for f in items]

        labels_by_file = {f: lab for f, lab in scan.train + scan.valid}
        split = {
            "data_root": str(scan.root),
            "layout": scan.layout,
            "seed": config.seed,
            "valid_pct": config.valid_pct if scan.layout == "random" else None,
            "vocab": vocab,
            "train": entries(learn.dls.train_ds.items),
            "valid": entries(learn.dls.valid_ds.items),
            "excluded": scan.excluded,
        }
        atomic_write_json(run / SPLIT_NAME, split)

        wall = time.time() - t_start
        metrics_out = {
            **final,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "lr": lr,
            "lr_find": lr_info,
            "wall_s": wall,
            "device": str(device) + (f" ({torch.cuda.get_device_name()})" if use_cuda else f" ({torch.get_num_threads()} threads)"),
            "preprocess_max_abs_diff_vs_fastai": diff,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        }
        atomic_write_json(reports / "metrics.json", metrics_out)
        rep.write_summary(run / "summary.md", {
            "arch": config.arch, "data_root": str(scan.root), "labels": vocab, "n_train": len(split["train"]),
            "n_valid": len(split["valid"]), "layout": scan.layout, "valid_pct": config.valid_pct, "seed": config.seed,
            "excluded": scan.excluded, "pretrained": weights_source, "item_size": config.item_size, "size": config.size,
            "mean": [round(v, 4) for v in spec.mean], "std": [round(v, 4) for v in spec.std], "lr": lr,
            "lr_find": lr_info, "schedule": ", ".join(schedule), "device": metrics_out["device"], "wall_s": wall,
            "metrics": final, "best_epoch": best_epoch, "epochs_run": len(history), "run_dir": str(out),
        })
    return out
