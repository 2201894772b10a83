"""Read a run folder (``model_meta.json``, ``split.json``, ``learner.pkl``) and find its images.

Light (json and pathlib only): the gate uses :func:`resolve_images` on a Jetson too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kimchi_edge.runtime.errors import BundleError, DataError, UsageError
from kimchi_edge.runtime.fsutil import read_json
from kimchi_edge.runtime.manifest import MODEL_META_NAME, SPLIT_NAME, Item, ModelMeta, Split, model_meta_from_dict, read_typed

__all__ = ["Item", "RunFolder", "SPLIT_NAME", "read_run", "resolve_images", "stratified_sample"]


@dataclass(frozen=True)
class RunFolder:
    path: Path
    meta: ModelMeta
    split: Split

    @property
    def train(self) -> tuple[Item, ...]:
        return self.split.train

    @property
    def valid(self) -> tuple[Item, ...]:
        return self.split.valid

    @property
    def test(self) -> tuple[Item, ...]:
        return self.split.test

    @property
    def data_root(self) -> Path:
        return Path(self.split.data_root)

    @property
    def learner(self) -> Path:
        return self.path / "learner.pkl"


def read_run(run_dir: str | Path) -> RunFolder:
    """Read and cross-check a run folder written by ``kimchi-edge train``.

    Raises:
        UsageError: the folder or one of its files is missing.
        BundleError: a file is malformed, or labels disagree between ``model_meta.json`` and
            ``split.json`` (including a class list of one).
    """
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UsageError(f"run folder {run} does not exist; train one with: kimchi-edge train DATA --out {run}")
    for name in (MODEL_META_NAME, SPLIT_NAME):
        if not (run / name).is_file():
            raise UsageError(f"{run} has no {name}: not a kimchi-edge run folder (or an interrupted one)")
    try:
        meta_raw = read_json(run / MODEL_META_NAME)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{run}: {exc}") from exc
    meta = model_meta_from_dict(meta_raw)  # refuses fewer than 2 labels
    split: Split = read_typed(Split, run / SPLIT_NAME)
    if split.vocab and split.vocab != meta.labels:
        raise BundleError(f"{run}: split.json vocab {list(split.vocab)} differs from model_meta.json labels {list(meta.labels)}")
    if not split.valid:
        raise BundleError(f"{run / SPLIT_NAME} has no validation images: the accuracy gate needs them")
    unknown = sorted({it.label for it in split.valid + split.train + split.test} - set(meta.labels))
    if unknown:
        raise BundleError(f"{run / SPLIT_NAME} has labels not in the model's vocab: {unknown[:5]}")
    return RunFolder(run, meta, split)


def resolve_images(items: Sequence[Item], data_root: str | Path, *, what: str = "validation", option: str = "--data") -> list[Path]:
    """Absolute paths of ``items`` under ``data_root``; all must exist.

    Raises:
        DataError: naming how many are missing, the first few, and the option that remaps the root.
    """
    root = Path(data_root).expanduser()
    paths = [root / it.file for it in items]
    missing = [it.file for it, p in zip(items, paths) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        where = f"{root} does not exist" if not root.is_dir() else f"not found under {root}"
        raise DataError(
            f"{len(missing)} of {len(items)} {what} images are missing ({where}): {shown}; "
            f"if the images moved, pass {option} NEW_ROOT (the folder that holds {items[0].file.split('/')[0]}/)"
        )
    return paths


def stratified_sample(items: Sequence[Item], count: int, labels: Sequence[str], *, seed: int = 0) -> list[Item]:
    """``count`` items with every class represented in proportion to its size (largest remainder).

    Each class gets at least one image when ``count >= number of classes``.  Deterministic for ``seed``.

    Raises:
        UsageError: ``count`` < 1 or larger than ``len(items)``.
    """
    if count < 1:
        raise UsageError(f"--calib {count}: need at least 1 calibration image")
    if count > len(items):
        raise UsageError(f"--calib {count} is larger than the training split ({len(items)} images); use --calib {len(items)} or fewer")
    rng = random.Random(seed)
    groups: dict[str, list[Item]] = {lab: [] for lab in labels}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    for g in groups.values():
        rng.shuffle(g)
    present = [lab for lab, g in groups.items() if g]
    total = len(items)
    quota = {lab: count * len(groups[lab]) / total for lab in present}
    take = {lab: int(q) for lab, q in quota.items()}
    if count >= len(present):
        for lab in present:
            take[lab] = max(take[lab], 1)
    left = count - sum(take.values())
    for lab in sorted(present, key=lambda lab: quota[lab] - int(quota[lab]), reverse=True):
        if left <= 0:
            break
        if take[lab] < len(groups[lab]):
            take[lab] += 1
            left -= 1
    while sum(take.values()) > count:  # minimum-one rule overshot: trim the largest
        lab = max(present, key=lambda lab: take[lab])
        take[lab] -= 1
    chosen = [it for lab in present for it in groups[lab][: take[lab]]]
    rng.shuffle(chosen)
    return chosen
