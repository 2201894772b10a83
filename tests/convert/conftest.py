"""One real pipeline for the convert tests: synthetic photos -> ``kimchi_edge.train.api.train`` -> run folder -> bundle.

The images are generated (no download, no ``../shared``): three colour classes with Korean names,
random sizes and aspect ratios, gradients and noise, 3 of 4 saved as JPEG and 1 of 4 as PNG, so the
decode, crop and batch-resample paths all run.  A ResNet-18 from scratch (no weights to download)
learns them in five epochs at 32 px (100 % top-1 with seed 0; with three, one borderline image let INT8 lose 1.1 points of 90 images).  Everything is session-scoped: built once, copied when a test
needs to damage it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

COLOURS = {"빨강 red": (200, 40, 40), "초록 green": (40, 170, 60), "파랑 blue": (40, 60, 200)}


def write_colour_photos(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """``root/{train,valid}/<class>/NNN.{jpg,png}``: noisy colour photos of random size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for label, base in COLOURS.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(48, 112)), int(rng.integers(48, 112))
                colour = np.clip(np.array(base) + rng.normal(0, 15, 3), 0, 255)
                yy, xx = np.mgrid[0:h, 0:w]
                grad = (xx / w - 0.5)[..., None] * rng.normal(0, 25, 3) + (yy / h - 0.5)[..., None] * rng.normal(0, 25, 3)
                img = np.clip(colour + grad + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                ext = ".png" if i % 4 == 0 else ".jpg"
                Image.fromarray(img).save(folder / f"{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    return write_colour_photos(tmp_path_factory.mktemp("colours") / "data", {"train": 30, "valid": 30})


@pytest.fixture(scope="session")
def run_dir(colour_data, tmp_path_factory) -> Path:
    """A real run folder from the training stage (ResNet-18 from scratch, 40 px item, 32 px model input)."""
    pytest.importorskip("fastai", reason="the convert tests need fastai (pip install 'kimchi-edge[convert]')")
    from fastai.torch_core import set_seed

    from kimchi_edge.train.api import TrainConfig, train

    set_seed(0, reproducible=True)  # train() seeds the split, not the weights: make the fixture repeatable
    out = tmp_path_factory.mktemp("runs") / "colours"
    return train(TrainConfig(
        data=colour_data, out=out, arch="resnet18", pretrained=False, item_size=40, size=32, epochs=5,
        lr_find=False, lr=3e-3, bs=8, quiet=True, top_losses=0,
    ))


@pytest.fixture(scope="session")
def built(run_dir):
    """``bundle_from_run`` on the run folder, asking for a TensorRT FP16 engine too (skipped with one line here)."""
    from kimchi_edge.convert.bundle import bundle_from_run

    messages: list[str] = []
    result = bundle_from_run(run_dir, quiet=True, engines=("fp16",), log=messages.append)
    result.notes.extend(f"log: {m}" for m in messages)
    return result


@pytest.fixture(scope="session")
def bundle(built) -> Path:
    return built.path


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle a test may damage."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy
