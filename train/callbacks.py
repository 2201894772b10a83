"""fastai callbacks of a training run: one numbering of epochs across phases, and a line per epoch.

``fine_tune`` runs two fits (frozen, then unfrozen) and fastai numbers the epochs of each from 0, so
its table and ``SaveModelCallback``'s "Better model found at epoch 0" name two different epochs 0.
Here every epoch has one index for the whole run (``history.json``, the plot, ``best_epoch`` in
``metrics.json`` and the printed lines all use it), and the best-model note is part of that epoch's line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback


class BestModelSaver(SaveModelCallback):
    """``SaveModelCallback`` that keeps the best weights without printing fastai's own epoch number."""

    def after_epoch(self) -> None:
        super(SaveModelCallback, self).after_epoch()  # TrackerCallback: sets self.new_best
        if self.new_best:
            self._save(self.fname)


class History(Callback):
    """One row per epoch across fine_tune's two fits and fit_one_cycle, numbered once for the run.

    Args:
        total_epochs: epochs planned for the whole run (for "epoch 3/5" and the ETA).
        saver: the run's :class:`BestModelSaver` (its verdict marks the best epoch).
        log: where the per-epoch lines go (``None``: nowhere).
    """

    order = SaveModelCallback.order + 1  # after Recorder and the saver

    def __init__(self, total_epochs: int, saver: BestModelSaver | None = None, log: Callable[[str], None] | None = None):
        self.rows: list[dict[str, Any]] = []
        self.phases: list[str] = []
        self.phase = ""
        self.total = total_epochs
        self.saver = saver
        self.log = log
        self.best_epoch: int | None = None
        self._t0 = 0.0
        self._seconds: list[float] = []

    def before_fit(self) -> None:
        self.phase = self.phases.pop(0) if self.phases else "fit"

    def before_epoch(self) -> None:
        self._t0 = time.perf_counter()

    def after_epoch(self) -> None:
        rec = self.learn.recorder
        names = list(rec.metric_names[1:-1])  # drop 'epoch' and 'time'
        vals = rec.values[-1] if rec.values else []
        row: dict[str, Any] = {"epoch": len(self.rows), "phase": self.phase}
        for n, v in zip(names, vals):
            row[n] = float(v) if v is not None else None
        self.rows.append(row)
        self._seconds.append(time.perf_counter() - self._t0)
        best = bool(self.saver is not None and getattr(self.saver, "new_best", False))
        if best:
            self.best_epoch = row["epoch"]
        if self.log is not None:
            self.log(epoch_line(row, self.total, self._seconds, best))


def epoch_line(row: dict[str, Any], total: int, seconds: list[float], best: bool) -> str:
    """``epoch 2 (3/5) unfrozen  train_loss 0.4100  valid_loss 0.3000  accuracy 0.9120  12 s  best so far  ETA 24 s``.

    ``epoch 2`` is the run's index (``history.json``, ``best_epoch``); ``(3/5)`` counts for the reader.
    """
    shown = "  ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "valid_loss", "accuracy") if isinstance(row.get(k), float))
    left = max(0, total - len(seconds))
    eta = f"  ETA {sum(seconds) / len(seconds) * left:.0f} s" if left else ""
    return (f"epoch {row['epoch']} ({len(seconds)}/{total}) {row['phase']:<8}  {shown}  {seconds[-1]:.0f} s"
            f"{'  best so far' if best else ''}{eta}")


class KeepPretrainedBatchNorm(Callback):
    """The pretrained body's BatchNorm layers stay as loaded through every fit: eval mode (running statistics not
    updated) and weights not trained, also after ``unfreeze()`` (which makes every parameter trainable again).

    fastai's ``BnFreeze`` holds only BatchNorm layers whose weights are frozen, i.e. only while the body is frozen.
    Why and what it measured: :func:`kimchi_edge.train.api.keep_pretrained_batchnorm`.  The head's BatchNorm layers
    (``learn.model[1]``) train as usual.
    """

    # before_fit runs before DistributedTrainer's (order 11), so DistributedDataParallel, built there, never registers
    # these weights as trainable; before_train runs after TrainEvalCallback (order -10) has put the model in train mode.
    order = 10

    def _body_batchnorm(self) -> list:
        import torch.nn as nn

        model = self.learn.model
        model = getattr(model, "module", model)  # inside a DistributedDataParallel (train --gpus N)
        return [m for m in model[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def before_fit(self) -> None:
        for m in self._body_batchnorm():  # unfreeze() between fine_tune's two fits made them trainable again
            for p in m.parameters():
                p.requires_grad_(False)

    def before_train(self) -> None:
        for m in self._body_batchnorm():
            m.eval()
