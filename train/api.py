"""The training stage as a function: data folder -> run folder (see docs/DESIGN.md and docs/TRAINING.md).

:func:`train` reads like its steps: data (screened, test held out) -> device -> learner -> proof that
the runtime's preprocessing matches fastai's -> learning rate -> fit -> evaluation on validation and
test -> files (learner, model_meta.json, split.json, reports, summary).
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kimchi_edge.runtime.errors import DataError, UsageError
from kimchi_edge.runtime.fsutil import atomic_directory, atomic_write_json
from kimchi_edge.runtime.manifest import MODEL_META_NAME, SPLIT_NAME, ModelMeta, to_dict

LEARNER_NAME = "learner.pkl"
METRIC_NAMES = ("valid_loss", "accuracy", "error_rate", "recall_macro", "precision_macro")  # learn.validate()'s order
LR_FIND_MIN_ITERS = 30
LR_FIND_LEAST_ITERS = 7  # the fewest --lr-find-iters fastai's suggestions survive
LR_FIND_MAX_ITERS = 100
LR_FIND_EPOCHS = 2  # about this many passes over the training set (within the bounds above)
LR_FIND_RANGE = (1e-5, 1.0)  # fastai's 1e-7..10 spends 4 of its 8 decades where no fine-tune rate lives

Log = Callable[[str], None]


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
    max_rotate: float = 10.0
    max_warp: float = 0.2
    max_lighting: float = 0.2
    resize_method: str = "crop"
    valid_pct: float = 0.2
    test_pct: float = 0.0
    seed: int = 42
    bs: int = 64
    epochs: int = 4
    freeze_epochs: int = 1  # 0: train every layer from the first epoch (one fit_one_cycle)
    # the pretrained body's BatchNorm layers during fine_tune: True trains them (fastai's default), False keeps them as
    # pretrained, None: kept for efficientnet_lite0 (measured), trained for the torchvision archs (not measured here)
    train_bn: bool | None = None
    lr_mult: float = 100.0  # discriminative learning rates: first layer group gets lr / lr_mult
    lr: float | None = None  # None: lr_find's suggestion
    lr_find: bool = True
    lr_find_iters: int | None = None  # None: scaled to the data, see lr_find_iterations
    one_cycle_epochs: int = 0
    one_cycle_lr: float | None = None
    early_stop: int = 0  # patience in epochs, 0 = off
    max_images_per_class: int | None = None
    overwrite: bool = False
    quiet: bool = False  # nothing on the console: no progress bars, no lines
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: bool = True  # on GPU only
    threads: int | None = None  # CPU intra-op threads; None: the cores the load average leaves free
    workers: int = 0
    top_losses: int = 9


@dataclass
class _Device:
    torch_device: Any
    cuda: bool
    threads: int
    description: str


@dataclass
class _Fit:
    history: list[dict[str, Any]]
    best_epoch: int
    schedule: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Result:
    """What a finished run reports: ``reports/metrics.json`` and the facts of ``summary.md``."""

    config: TrainConfig
    split: Any  # runtime.manifest.Split
    meta: ModelMeta
    fit: _Fit
    lr: float
    lr_info: dict[str, float]
    valid: dict[str, float]
    test: dict[str, float] | None
    device: str
    preprocess_diff: float
    wall_s: float

    def metrics(self) -> dict[str, Any]:
        return {
            **self.valid,
            "test": self.test,
            "n_train": len(self.split.train), "n_valid": len(self.split.valid), "n_test": len(self.split.test),
            "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history),
            "lr": self.lr,
            "lr_find": self.lr_info,
            "wall_s": self.wall_s,
            "fit_s": self.fit.seconds,
            "device": self.device,
            "preprocess_max_abs_diff_vs_fastai": self.preprocess_diff,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
        }

    def summary_info(self, run_dir: Path) -> dict[str, Any]:
        c, p = self.config, self.meta.preprocessing
        return {
            "arch": c.arch, "data_root": self.split.data_root, "labels": list(self.meta.labels),
            "n_train": len(self.split.train), "n_valid": len(self.split.valid), "n_test": len(self.split.test),
            "layout": self.split.layout, "valid_pct": c.valid_pct, "test_pct": c.test_pct, "seed": c.seed,
            "excluded": list(self.split.excluded), "pretrained": self.meta.pretrained, "item_size": c.item_size,
            "size": c.size, "mean": [round(v, 4) for v in p.mean], "std": [round(v, 4) for v in p.std], "lr": self.lr,
            "lr_find": self.lr_info, "schedule": ", ".join(self.fit.schedule), "device": self.device, "wall_s": self.wall_s,
            "metrics": self.valid, "test_metrics": self.test, "best_epoch": self.fit.best_epoch,
            "epochs_run": len(self.fit.history), "run_dir": str(run_dir),
        }


def lr_find_iterations(n_train: int, bs: int, requested: int | None = None) -> int:
    """Iterations for ``lr_find``: ``requested``, else about two epochs' worth of batches within [30, 100].

    fastai's default of 100 iterations at batch 64 is 6,400 images: 26 passes over a 244-image set,
    longer than the training itself.  A learning-rate curve needs a few dozen points, not more passes,
    if they are spent on the useful range (``LR_FIND_RANGE``).  Measured on the digits (Lite0, 48 px,
    frozen body, valley suggestion): fastai's 100 iterations over 1e-7..10 -> 1.7e-3; over 1e-5..1:
    100 -> 2.2e-3, 40 -> 1.8e-3, 30 -> 1.5e-3, 20 -> 1.0e-3; 20 over 1e-7..10 -> 4.0e-4 (too coarse).
    """
    if requested is not None:
        if requested < LR_FIND_LEAST_ITERS:
            # fastai scores its suggestions on points [n//10 : n-5]; `steep` needs two of them (IndexError below 7)
            raise UsageError(f"--lr-find-iters {requested}: expected at least {LR_FIND_LEAST_ITERS} "
                             "(fastai's lr_find drops its first tenth and last 5 points), or --no-lr-find with --lr")
        return requested
    batches = max(1, n_train // max(1, bs))  # the training DataLoader drops the last partial batch
    return int(min(LR_FIND_MAX_ITERS, max(LR_FIND_MIN_ITERS, LR_FIND_EPOCHS * batches)))


def planned_epochs(config: TrainConfig) -> int:
    """Epochs the schedule will run (before early stopping)."""
    n = (config.freeze_epochs + config.epochs) if (config.pretrained or config.weights) else config.epochs
    return n + config.one_cycle_epochs


def train(config: TrainConfig, *, log: Log | None = None) -> Path | None:
    """Train, pick the best epoch by validation loss, export, and write reports.

    The run folder is built under a temporary name and renamed at the end, so an interrupted run never
    leaves a ``learner.pkl`` that looks complete.  Started by torchrun / accelerate launch (``WORLD_SIZE`` > 1,
    see :mod:`kimchi_edge.train.distributed`), every process calls this: rank 0 alone screens, evaluates,
    reports, runs lr_find and writes the run folder; all ranks take part in the fit; the others print nothing.

    Args:
        config: the run's settings.
        log: where progress lines go (default: stdout; nothing when ``config.quiet``, nor on ranks other than 0).
            fastai's progress bars go to stdout, on a terminal only.

    Returns:
        The run folder (None on ranks other than 0, which write nothing).

    Raises:
        DataError: unusable data (exit code 2, nothing written).
        UsageError: bad options (exit code 2, nothing written).
    """
    from .distributed import (
        alone,
        fastai_distributed,
        init_process_group,
        leave,
        share_from_rank0,
        world,
    )

    t_start = time.time()
    w = world()
    say: Log = (lambda msg: None) if config.quiet or not w.is_rank0 else (log or (lambda msg: print(msg, flush=True)))
    out = Path(config.out)
    backend = init_process_group(w, _wants_cuda(config)) if w.distributed else None
    if backend:
        say(f"distributed: world size {w.size} ({w.local_size} on this machine, {backend}); "
            "rank 0 screens, evaluates and writes the run folder")
    scan = share_from_rank0(w, lambda: _checked_data(config, out, say))  # everything checkable without fastai first

    from .third_party import importing_fastai

    with importing_fastai():
        from fastai.vision.all import set_seed

    from . import reports as rep

    rep.setup_matplotlib()
    device = _setup_device(config, w, backend)
    set_seed(config.seed)  # split, head init and batch order: the same run gives the same learner

    folder = atomic_directory(out, overwrite=config.overwrite) if w.is_rank0 else contextlib.nullcontext()
    with folder as partial:
        run = share_from_rank0(w, lambda: partial)  # the other ranks read the best epoch's weights from it
        reports = run / "reports"
        if w.is_rank0:
            reports.mkdir()
        learn, weights_source = _build_learner(config, scan, device, run, say, w)
        spec, diff = share_from_rank0(w, lambda: _check_preprocessing(learn))
        lr, lr_info = share_from_rank0(w, lambda: _choose_lr(learn, config, reports, say))
        with fastai_distributed(learn, w, device.cuda):
            fit = _fit(learn, config, lr, say)
        leave(w)  # every rank has loaded the best weights: rank 0 may now remove the checkpoint
        if not w.is_rank0:
            return None
        with alone():
            _write_results(learn, config, scan, device, run, out, reports, weights_source, spec, diff, lr, lr_info, fit,
                           t_start, say)
    return out


def _write_results(learn, config: TrainConfig, scan, device: _Device, run: Path, out: Path, reports: Path,
                   weights_source, spec, diff: float, lr: float, lr_info: dict, fit: _Fit, t_start: float, say: Log) -> None:
    """Evaluation on validation and test, reports, the exported learner, model_meta.json, split.json, summary."""
    from . import reports as rep

    t_eval = time.perf_counter()
    valid_metrics = _evaluate(learn, device)
    test_metrics = _evaluate(learn, device, files=[f for f, _ in scan.test]) if scan.test else None
    rep.interpretation(learn, reports, top_losses=config.top_losses)
    rep.write_history(reports, fit.history)
    rep.plot_history(reports, fit.history, fit.best_epoch)
    say(f"evaluated the exported epoch {fit.best_epoch} on {len(learn.dls.valid_ds)} validation"
        + (f" and {len(scan.test)} test" if scan.test else "") + f" images in {time.perf_counter() - t_eval:.0f} s")
    _export(learn, run)

    meta = ModelMeta(labels=tuple(str(v) for v in learn.dls.vocab), architecture=config.arch, preprocessing=spec,
                     pretrained=weights_source, framework=_versions())
    atomic_write_json(run / MODEL_META_NAME, to_dict(meta))
    split = write_split(run / SPLIT_NAME, scan, learn, config)
    result = _Result(config, split, meta, fit, lr, lr_info, valid_metrics, test_metrics, device.description, diff,
                     wall_s=time.time() - t_start)
    atomic_write_json(reports / "metrics.json", result.metrics())
    rep.write_summary(run / "summary.md", result.summary_info(out))


# --------------------------------------------------------------------------- steps


def _checked_data(config: TrainConfig, out: Path, say: Log):
    """The checks that need no fastai, then the screened data (rank 0 alone in a distributed run)."""
    if out.exists() and not config.overwrite:
        raise UsageError(f"{out} already exists; choose another --out or pass --overwrite")
    if planned_epochs(config) == 0:
        raise UsageError("no epochs to train: set --epochs (and/or --freeze-epochs, --one-cycle-epochs)")
    return _load_data(config, say)


def _load_data(config: TrainConfig, say: Log):
    """Scan and screen the data folder, subsample, hold out the test split."""
    from .data import hold_out_test, scan_dataset

    if not 0 <= config.test_pct < 1:
        raise UsageError(f"--test-pct must be between 0 and 1, got {config.test_pct}")
    t0 = time.perf_counter()
    scan = scan_dataset(config.data, quiet=config.quiet)
    scan.train = _subsample(scan.train, config.max_images_per_class, config.seed)
    scan.valid = _subsample(scan.valid, config.max_images_per_class, config.seed)
    scan.test = _subsample(scan.test, config.max_images_per_class, config.seed)
    if scan.layout == "random" and config.valid_pct + config.test_pct >= 1:
        raise UsageError(f"--valid-pct {config.valid_pct} + --test-pct {config.test_pct} leave nothing to train on")
    scan = hold_out_test(scan, config.test_pct, config.seed)
    n = len(scan.train) + len(scan.valid) + len(scan.test)
    say(f"data: {n} images in {len(scan.classes)} classes screened in {time.perf_counter() - t0:.1f} s"
        + (f", {len(scan.excluded)} unreadable left out" if scan.excluded else "")
        + (f"; {len(scan.test)} held out for testing" if scan.test else ""))
    return scan


def _wants_cuda(config: TrainConfig) -> bool:
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no CUDA GPU")
    return torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"


def _setup_device(config: TrainConfig, w=None, backend: str | None = None) -> _Device:
    """This process's device; in a distributed run its local rank's GPU, or its share of the CPU cores.

    CPU threads in a distributed run: ``--threads``, else ``OMP_NUM_THREADS`` (which torchrun, accelerate
    launch and ``--gpus`` set for each process), else the free cores divided by the processes on this machine.
    """
    import os

    import torch

    from .cpu import cpu_count, default_threads, setup_cpu_training

    use_cuda = _wants_cuda(config)
    if config.threads is not None and config.threads < 1:
        raise UsageError(f"--threads {config.threads}: expected at least 1")
    procs = f", {w.size} processes ({backend})" if backend else ""
    if use_cuda:
        index = w.local_rank if backend else torch.cuda.current_device()
        return _Device(torch.device("cuda", index), True, torch.get_num_threads(),
                       f"cuda ({torch.cuda.get_device_name(index)}){procs}")
    load = _load_average()
    threads = config.threads
    if backend and threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.isdigit() and int(omp) > 0 else max(1, default_threads() // w.local_size)
    n = setup_cpu_training(threads)
    return _Device(torch.device("cpu"), False, n, f"cpu ({n} thread{'s' * (n > 1)} on {cpu_count()} cores" +
                   (f", load average {load:.1f} before training" if load is not None else "") + f"){procs}")


def _metrics() -> list:
    """accuracy, error rate, macro recall and precision (zero, not a warning, for a class never predicted)."""
    import sklearn.metrics as skm
    from fastai.vision.all import accuracy, error_rate, skm_to_fastai

    return [accuracy, error_rate,
            skm_to_fastai(skm.recall_score, average="macro", zero_division=0, name="recall_macro"),
            skm_to_fastai(skm.precision_score, average="macro", zero_division=0, name="precision_macro")]


def keep_pretrained_batchnorm(learn) -> None:
    """Through ``fine_tune`` (frozen, then unfrozen) the pretrained body's BatchNorm layers stay exactly as pretrained:
    eval mode and weights not trained (:class:`~kimchi_edge.train.callbacks.KeepPretrainedBatchNorm`).

    fastai's default (``train_bn=True``) trains them, in train mode, so their running statistics become those of
    augmented training batches.  Measured on food10 with EfficientNet-Lite0 (1500 training images, 2 threads):

    * head only, ``fit_one_cycle(3, 3e-3)``: 77.2 / 77.6 / 78.0 % validation accuracy after each epoch with them
      kept, against 38.0 / 61.4 / 68.0 % after the first epochs of a head-only run with them trained; a head trained
      on the pretrained body's features of un-augmented images reaches 79.4 %;
    * ``fine_tune(3, freeze_epochs=1)`` kept only while frozen (fastai's ``BnFreeze``): 74.4 % after the frozen
      epoch, then 67.8 / 67.0 % once unfrozen (BatchNorm training again), as Keras's EfficientNet fine-tuning guide
      warns; so they stay kept after ``unfreeze()`` too.

    When a run does this: :func:`keeps_pretrained_batchnorm` (``--train-bn`` / ``--keep-bn`` decide; by default the
    measured arch).  ``--freeze-epochs 0`` (every layer from the start, the quickstart's recipe for digits, which look
    nothing like ImageNet) trains them.
    """
    from .callbacks import KeepPretrainedBatchNorm

    learn.train_bn = False
    learn.opt = None  # the optimizer vision_learner made treats BatchNorm weights as trainable (train_bn=True)
    learn.freeze()
    learn.add_cb(KeepPretrainedBatchNorm())


def keeps_pretrained_batchnorm(config: TrainConfig) -> bool:
    """Whether this run keeps the pretrained body's BatchNorm layers as pretrained (:func:`keep_pretrained_batchnorm`).

    Only a pretrained ``fine_tune`` (``freeze_epochs`` >= 1) can: ``--freeze-epochs 0`` and random init train them.  By
    default (``train_bn=None``) for the archs it was measured on (``efficientnet_lite0``, TF-ported: food10 69.6 ->
    78.8 %); the torchvision archs keep fastai's default, as their ImageNet weights can't be fetched here to measure
    it (``--keep-bn`` asks for it on any arch).
    """
    from .archs_names import TIMM_ARCHS

    if not (config.pretrained or config.weights) or not config.freeze_epochs:
        return False
    return config.arch in TIMM_ARCHS if config.train_bn is None else not config.train_bn


def _build_learner(config: TrainConfig, scan, device: _Device, run: Path, say: Log, w=None):
    from .archs import learner_for_arch
    from .data import make_dataloaders

    valid_pct = config.valid_pct / (1 - config.test_pct) if scan.layout == "random" else config.valid_pct
    dls = make_dataloaders(
        scan, item_size=config.item_size, size=config.size, min_scale=config.min_scale, augment=config.augment,
        flip=config.flip, max_rotate=config.max_rotate, max_warp=config.max_warp, max_lighting=config.max_lighting,
        resize_method=config.resize_method, valid_pct=valid_pct, seed=config.seed, bs=config.bs,
        num_workers=config.workers, device=device.torch_device,
    )
    learn, weights_source = learner_for_arch(
        dls, config.arch, pretrained=config.pretrained, weights=config.weights, metrics=_metrics(), path=run
    )
    if keeps_pretrained_batchnorm(config):
        keep_pretrained_batchnorm(learn)
    if device.cuda and config.mixed_precision:
        learn.to_channelslast()  # channels_last + mixed precision (fastai's ChannelsLast/MixedPrecision)
    from fastcore.basics import noop

    learn.logger = noop  # fastai's table numbers each fit's epochs from 0; History prints one line per epoch instead
    if config.quiet or not sys.stdout.isatty() or (w is not None and not w.is_rank0):
        from fastai.callback.progress import ProgressCallback

        learn.remove_cb(ProgressCallback)
    say(f"model: {config.arch} ({weights_source or 'random init'}), {len(dls.train_ds)} train / {len(dls.valid_ds)} valid images "
        f"at {config.size} px, batch {_batch_text(config.bs, w)}, on {device.description}")
    return learn, weights_source


def _batch_text(bs: int, w) -> str:
    """``64``, or ``16 per process (32 in all)`` in a distributed run: ``--bs`` is per process, as in fastai."""
    return f"{bs} per process ({bs * w.size} in all)" if w is not None and w.distributed else str(bs)


def _check_preprocessing(learn):
    """What the runtime will do, read from the pipeline and proven on real validation files."""
    from .spec import compare_with_fastai, preprocessing_from_dls

    spec = preprocessing_from_dls(learn.dls)
    probe = list(learn.dls.valid_ds.items)[:4]
    diff = compare_with_fastai(learn.dls, spec, probe)
    if diff > (0.51 if spec.dtype == "uint8" else 0.01):
        raise DataError(f"runtime preprocessing differs from fastai's by {diff:.2f}/255 on {probe[0]}; please report this")
    return spec, diff


def _choose_lr(learn, config: TrainConfig, reports: Path, say: Log) -> tuple[float, dict[str, float]]:
    """The given ``--lr``, else lr_find's valley suggestion (plotted to ``reports/lr_find.png``).

    In a distributed run rank 0 runs it alone, at one process's batch (fastai's lr_find is not DDP-safe: each
    rank saves and reloads the model in its own temporary folder, and rank 0 then waits at a barrier in
    ``Learner.load`` that the others never reach).
    """
    from fastai.vision.all import minimum, steep, valley

    from . import reports as rep

    if config.lr is not None or not config.lr_find:
        return float(config.lr or 2e-3), {}
    iters = lr_find_iterations(len(learn.dls.train_ds), config.bs, config.lr_find_iters)
    if not config.freeze_epochs:
        learn.unfreeze()  # find the rate for the model that will be trained: all layers
    say(f"lr_find: {iters} iterations ...")
    t0 = time.perf_counter()
    sug = learn.lr_find(start_lr=LR_FIND_RANGE[0], end_lr=LR_FIND_RANGE[1], suggest_funcs=(minimum, steep, valley),
                        show_plot=True, num_it=iters)
    rep.save_current_figure(reports / "lr_find.png")
    info = {k: float(v) for k, v in sug._asdict().items()}
    info["iterations"] = len(learn.recorder.lrs)  # what ran (fastai stops early when the loss diverges)
    lr = info.get("valley") or 2e-3
    if not math.isfinite(lr):
        lr = 2e-3
    say(f"lr_find: {info['iterations']} iterations in {time.perf_counter() - t0:.0f} s; valley {lr:.1e} (used), minimum/10 {info.get('minimum', float('nan')):.1e}")
    return float(lr), info


def _fit(learn, config: TrainConfig, lr: float, say: Log) -> _Fit:
    """fine_tune (or fit_one_cycle from scratch), then the optional extra fit_one_cycle; best epoch kept."""
    from fastai.callback.tracker import EarlyStoppingCallback

    from .callbacks import BestModelSaver, History

    total = planned_epochs(config)
    saver = BestModelSaver(monitor="valid_loss", fname="best", with_opt=False, reset_on_fit=False)
    history = History(total, saver, say)
    cbs: list[Any] = [saver]
    if config.early_stop:
        cbs.append(EarlyStoppingCallback(monitor="valid_loss", patience=config.early_stop, reset_on_fit=False))
    learn.add_cb(history)
    schedule = []
    t0 = time.perf_counter()
    say(f"training: {total} epoch{'s' * (total != 1)}")
    if (config.pretrained or config.weights) and config.freeze_epochs:
        history.phases = ["frozen", "unfrozen"]
        learn.fine_tune(config.epochs, base_lr=lr, freeze_epochs=config.freeze_epochs, lr_mult=config.lr_mult, cbs=cbs)
        schedule.append(f"fine_tune({config.epochs}, base_lr={lr:.1e}, freeze_epochs={config.freeze_epochs}, lr_mult={config.lr_mult:g})"
                        + ("; the body's BatchNorm layers kept as pretrained throughout" if keeps_pretrained_batchnorm(config) else ""))
    elif config.pretrained or config.weights:  # every layer from the start: one cycle, discriminative lr if lr_mult > 1
        history.phases = ["unfrozen"]
        learn.unfreeze()
        lrs = slice(lr / config.lr_mult, lr) if config.lr_mult != 1 else lr
        learn.fit_one_cycle(config.epochs, lrs, cbs=cbs)
        schedule.append(f"unfreeze, fit_one_cycle({config.epochs}, lr_max={lr:.1e}" + (f", lr_mult={config.lr_mult:g})" if config.lr_mult != 1 else ")"))
    elif config.epochs:
        history.phases = ["scratch"]
        learn.fit_one_cycle(config.epochs, lr, cbs=cbs)
        schedule.append(f"fit_one_cycle({config.epochs}, {lr:.1e}) from scratch")
    if config.one_cycle_epochs:
        history.phases = ["one_cycle"]
        lr_max = config.one_cycle_lr or lr / 10
        learn.fit_one_cycle(config.one_cycle_epochs, slice(lr_max / 10, lr_max), cbs=cbs)
        schedule.append(f"fit_one_cycle({config.one_cycle_epochs}, lr_max={lr_max:.1e})")
    learn.remove_cb(history)
    rows = history.rows
    if not rows:
        raise UsageError("no epochs to train: set --epochs (and/or --freeze-epochs, --one-cycle-epochs)")
    best = history.best_epoch  # the epoch whose weights the saver kept (and loaded back)
    if best is None:
        raise DataError(f"no epoch had a finite validation loss ({[r['valid_loss'] for r in rows]}); try a lower --lr")
    return _Fit(rows, best, schedule, time.perf_counter() - t0)


def _evaluate(learn, device: _Device, files: list[Path] | None = None) -> dict[str, float]:
    """Loss and metrics of the current (best) weights on the validation split, or on ``files`` (the test split)."""
    if device.cuda:
        learn.to_contiguous(to_fp32=True)
    dl = None if files is None else learn.dls.test_dl(files, with_labels=True)
    vals = learn.validate(dl=dl)
    out = {n: float(v) for n, v in zip(METRIC_NAMES, vals)}
    if files is not None:
        out = {("loss" if k == "valid_loss" else k): v for k, v in out.items()}
    return out


def _export(learn, run: Path) -> None:
    """The learner without the run's callbacks or checkpoint, as ``learner.pkl``."""
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ in ("BestModelSaver", "EarlyStoppingCallback", "KeepPretrainedBatchNorm")])
    (run / "models" / "best.pth").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (run / "models").rmdir()
    learn.path = run
    learn.export(LEARNER_NAME)


def write_split(path: Path, scan, learn, config: TrainConfig):
    """Write ``split.json``: the exact files of train, valid (chose the epoch, gated) and test (never chose anything).

    Returns:
        The :class:`kimchi_edge.runtime.manifest.Split` written.
    """
    from kimchi_edge.runtime.manifest import Item, Split, write_typed

    labels_by_file = {f: lab for f, lab in scan.train + scan.valid + scan.test}

    def items(files) -> tuple[Item, ...]:
        return tuple(Item(scan.relative(Path(f)), labels_by_file[Path(f)]) for f in files)

    split = Split(
        data_root=str(scan.root),
        layout=scan.layout,
        seed=config.seed,
        valid_pct=config.valid_pct if scan.layout == "random" else None,
        test_pct=config.test_pct or None,
        vocab=tuple(str(v) for v in learn.dls.vocab),
        train=items(learn.dls.train_ds.items),
        valid=items(learn.dls.valid_ds.items),
        test=items(f for f, _ in scan.test),
        excluded=tuple(scan.excluded),
    )
    write_typed(path, split)
    return split


# --------------------------------------------------------------------------- helpers


def _load_average() -> float | None:
    from kimchi_edge.runtime.sysinfo import loadavg

    one = loadavg()
    return one[0] if one else None


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
