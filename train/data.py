"""Data: find the images of a folder-per-class tree, screen them, and build fastai DataLoaders.

Two layouts are understood:

* ``DATA/<class>/...`` — a random split (``valid_pct``, ``seed``);
* ``DATA/train/<class>/...`` + ``DATA/valid/<class>/...`` (+ optionally ``DATA/test/<class>/...``) —
  the split as given.

A held-out test split comes from ``DATA/test/`` or from ``--test-pct`` (:func:`hold_out_test`: drawn
per class, before the validation split).  The test images never choose anything: the best epoch is
picked on validation, and the gate scores validation too.

Class names are the folder names, kept as exact Unicode (Korean, spaces, mixed case).  Image files
are recognised by extension in any case.  Every file is decoded once before training: unreadable
files are listed in the report and left out, so a corrupt file never crashes an epoch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimchi_edge.runtime.errors import DataError, InvalidInputError
from kimchi_edge.runtime.preprocess import decode_image
from kimchi_edge.runtime.sysinfo import IMAGE_SUFFIXES

from .image_type import (
    PILImageUpright,  # fastai's image type (None without fastai), see that module
)

SPLIT_NAMES = ("train", "valid")
TEST_NAME = "test"


@dataclass
class DatasetScan:
    """What was found under a data root."""

    root: Path
    layout: str  # "given" | "random"
    train: list[tuple[Path, str]] = field(default_factory=list)  # (file, label); for "random": all files
    valid: list[tuple[Path, str]] = field(default_factory=list)  # only for "given"
    test: list[tuple[Path, str]] = field(default_factory=list)  # DATA/test/, or held out by hold_out_test
    excluded: list[dict[str, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _check_readable(path: Path) -> str | None:
    try:
        decode_image(path, draft=(64, 64))  # the runtime's pixel and decoded-memory limits
    except InvalidInputError as exc:
        return str(exc)
    return None


def scan_dataset(root: str | Path, *, screen: bool = True, workers: int = 4, quiet: bool = True) -> DatasetScan:
    """Find classes and images under ``root`` and screen out unreadable files.

    Args:
        root: the data folder (either layout, see the module docstring).
        screen: decode every file once and leave out the unreadable ones.
        workers: decoding threads for the screening.
        quiet: no progress bar for the screening (there is one on a terminal otherwise).

    Raises:
        DataError: missing path, no class folders, a single class, a class without images, a
            ``test/`` folder beside ``train/`` without ``valid/``, or a test class unknown to training.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is a file; expected a folder with one sub-folder per class")
    root = root.resolve()
    given = all((root / s).is_dir() for s in SPLIT_NAMES)
    if not given and (root / "train").is_dir() and (root / TEST_NAME).is_dir():
        raise DataError(f"{root} has train/ and test/ but no valid/; add valid/<class>/... (the best epoch is chosen on it)")
    scan = DatasetScan(root=root, layout="given" if given else "random")

    def collect(base: Path, where: str) -> list[tuple[Path, str]]:
        dirs = _class_dirs(base)
        if not dirs:
            raise DataError(f"{base} has no class folders; expected {where}<class>/<images>")
        items: list[tuple[Path, str]] = []
        for d in dirs:
            files = _images_in(d)
            if not files:
                raise DataError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            items += [(f, d.name) for f in files]
        return items

    if given:
        scan.train = collect(root / "train", "train/")
        scan.valid = collect(root / "valid", "valid/")
        train_classes = {lab for _, lab in scan.train}
        unknown = sorted({lab for _, lab in scan.valid} - train_classes)
        if unknown:
            raise DataError(f"valid/ has classes with no training images: {unknown}")
        if (root / TEST_NAME).is_dir():
            scan.test = collect(root / TEST_NAME, "test/")
            unknown = sorted({lab for _, lab in scan.test} - train_classes)
            if unknown:
                raise DataError(f"test/ has classes with no training images: {unknown}")
        scan.classes = sorted(train_classes)
    else:
        scan.train = collect(root, "")
        scan.classes = sorted({lab for _, lab in scan.train})
    if len(scan.classes) < 2:
        raise DataError(f"found a single class {scan.classes} under {root}; a classifier needs at least 2 class folders")

    if screen:
        everything = scan.train + scan.valid + scan.test
        problems = _screen([f for f, _ in everything], workers=workers, quiet=quiet)
        bad = {item[0] for item, problem in zip(everything, problems) if problem}
        scan.excluded = [
            {"file": scan.relative(item[0]), "label": item[1], "reason": problem}
            for item, problem in zip(everything, problems)
            if problem
        ]
        scan.train = [it for it in scan.train if it[0] not in bad]
        scan.valid = [it for it in scan.valid if it[0] not in bad]
        scan.test = [it for it in scan.test if it[0] not in bad]
        left = {lab for _, lab in scan.train}
        empty = [c for c in scan.classes if c not in left]
        if empty:
            raise DataError(f"after leaving out unreadable files, class(es) {empty} have no training images")
    return scan


def _screen(files: list[Path], *, workers: int, quiet: bool) -> list[str | None]:
    """``_check_readable`` of every file, in threads, with a progress bar on a terminal."""
    from kimchi_edge.convert.progress import progress

    out: list[str | None] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, progress(total=len(files), desc="screening images", quiet=quiet, unit="img") as bar:
        for problem in pool.map(_check_readable, files):
            out.append(problem)
            bar.update(1)
    return out


def hold_out_test(scan: DatasetScan, test_pct: float, seed: int) -> DatasetScan:
    """Move ``test_pct`` of the images (of all of them, per class, at least one each) into ``scan.test``.

    The images come from ``scan.train`` (for the random layout: all images; for the given layout: the
    training split, so ``valid/`` stays as given).  Seeded, so the same data and seed hold out the same files.

    Raises:
        DataError: ``test_pct`` outside [0, 1), ``DATA/test/`` exists already, or a class too small to
            keep a training image.
    """
    if test_pct == 0:
        return scan
    if not 0 < test_pct < 1:
        raise DataError(f"--test-pct must be between 0 and 1, got {test_pct}")
    if scan.test:
        raise DataError(f"{scan.root} has a test/ folder already; leave out --test-pct (or remove test/)")
    import random

    rng = random.Random(seed)
    by: dict[str, list[tuple[Path, str]]] = {}
    for item in scan.train:
        by.setdefault(item[1], []).append(item)
    n_all = {lab: len(items) for lab, items in by.items()}
    for f, lab in scan.valid:
        n_all[lab] = n_all.get(lab, 0) + 1
    held: set[Path] = set()
    for lab in sorted(by):
        items = sorted(by[lab])
        k = max(1, round(test_pct * n_all[lab]))
        if k >= len(items):
            raise DataError(f"class {lab!r} has {len(items)} image(s): too few to hold out {test_pct:.0%} for testing and still train")
        held.update(f for f, _ in rng.sample(items, k))
    scan.test = [it for it in scan.train if it[0] in held]
    scan.train = [it for it in scan.train if it[0] not in held]
    return scan


# --------------------------------------------------------------------------- fastai glue


class ClassFolderLabel:
    """Label of a file = the name of its class folder (the first folder under a split root)."""

    def __init__(self, roots: list[Path]):
        self.roots = [str(r) for r in roots]

    def __call__(self, path: Any) -> str:
        p = Path(path)
        for r in self.roots:
            try:
                return p.relative_to(r).parts[0]
            except ValueError:
                continue
        return p.parent.name


def make_dataloaders(
    scan: DatasetScan,
    *,
    item_size: int | tuple[int, int] = 460,
    size: int | tuple[int, int] = 224,
    min_scale: float = 0.75,
    augment: float = 1.0,
    flip: bool = True,
    max_rotate: float = 10.0,
    max_warp: float = 0.2,
    max_lighting: float = 0.2,
    resize_method: str = "crop",
    valid_pct: float = 0.2,
    seed: int = 42,
    bs: int = 64,
    num_workers: int = 0,
    device: Any = None,
):
    """The seeds' DataBlock: ``Resize(item_size)`` presizing + ``aug_transforms(size, min_scale)``.

    ``augment`` scales the augmentation strength (``aug_transforms(mult=augment)``); 0 turns it off;
    ``flip=False`` for data where a mirror image is another class (digits, text); ``max_rotate``
    (degrees), ``max_warp`` and ``max_lighting`` are aug_transforms' own (before ``mult``).
    Normalisation is added by ``vision_learner`` from the architecture's pretrained statistics (and
    read back from the pipeline afterwards, see :func:`kimchi_edge.train.spec.preprocessing_from_dls`).
    """
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        IndexSplitter,
        RandomSplitter,
        Resize,
        ResizeMethod,
        aug_transforms,
    )

    if resize_method not in ("crop", "squish"):
        raise DataError(f"--resize-method {resize_method!r}: expected crop or squish")
    files = [f for f, _ in scan.train] + [f for f, _ in scan.valid]
    if scan.layout == "given":
        splitter = IndexSplitter(list(range(len(scan.train), len(files))))
        roots = [scan.root / "train", scan.root / "valid", scan.root / TEST_NAME]
    else:
        if not 0 < valid_pct < 1:
            raise DataError(f"--valid-pct must be between 0 and 1, got {valid_pct}")
        splitter = RandomSplitter(valid_pct=valid_pct, seed=seed)
        roots = [scan.root]
    batch_tfms = []
    if augment > 0:
        batch_tfms = aug_transforms(size=size, min_scale=min_scale, mult=augment, do_flip=flip, max_rotate=max_rotate,
                                    max_warp=max_warp, max_lighting=max_lighting)
    elif size != item_size:
        batch_tfms = aug_transforms(size=size, min_scale=min_scale, do_flip=False, max_rotate=0, max_zoom=1,
                                    max_lighting=0, max_warp=0)
    dblock = DataBlock(
        blocks=(ImageBlock(cls=PILImageUpright), CategoryBlock(vocab=scan.classes)),
        get_y=ClassFolderLabel(roots),
        splitter=splitter,
        item_tfms=Resize(item_size, method=ResizeMethod.Crop if resize_method == "crop" else ResizeMethod.Squish),
        batch_tfms=batch_tfms,
    )
    kwargs: dict[str, Any] = {"bs": bs, "num_workers": num_workers}
    if device is not None:
        kwargs["device"] = device
    dls = dblock.dataloaders(files, **kwargs)
    if len(dls.valid_ds) == 0:
        raise DataError("the validation split is empty; add images or raise --valid-pct")
    return dls
