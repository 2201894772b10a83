"""Small real datasets for the training tests, built from the bundled digits (no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Korean, a space, mixed case: class names must survive exactly.
KIMCHI_CLASSES = {"0 영": "배추김치", "1 일": "오이 소박이", "7 칠": "Pa Kimchi"}
EXTS = [".png", ".PNG", ".Png"]


def build_tree(digits: Path, out: Path, per_class: int, given_split: bool = False) -> Path:
    """Copy ``per_class`` digit images of three classes under kimchi names; mixed-case extensions."""
    for src_label, name in KIMCHI_CLASSES.items():
        files = sorted((digits / src_label).glob("*.png"))[:per_class]
        for i, f in enumerate(files):
            split = ("valid" if i % 4 == 0 else "train") if given_split else None
            target = out / split / name if split else out / name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target / f"{f.stem}{EXTS[i % len(EXTS)]}")
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    from kimchi_edge.train.sample import write_digits_sample

    return write_digits_sample(tmp_path_factory.mktemp("digits"), per_class=40)


@pytest.fixture(scope="session")
def kimchi_tree(digits, tmp_path_factory) -> Path:
    """Random-split layout with a corrupt JPEG and a text file named .jpg in one class."""
    root = build_tree(digits, tmp_path_factory.mktemp("kimchi") / "data", per_class=30)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(next((root / "배추김치").iterdir())).convert("RGB").resize((256, 256)).save(buf, "JPEG")
    (root / "배추김치" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    (root / "오이 소박이" / "notes.jpg").write_text("not an image", encoding="utf-8")
    (root / "Pa Kimchi" / "README.txt").write_text("ignored: not an image extension", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_run(kimchi_tree, tmp_path_factory) -> Path:
    """One real training run (EfficientNet-Lite0 with its shipped ImageNet weights, 32 px, 2 epochs)."""
    from kimchi_edge.train.api import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train(TrainConfig(
        data=kimchi_tree, out=out, arch="efficientnet_lite0", item_size=40, size=32, flip=False, epochs=1,
        freeze_epochs=1, bs=16, lr_find_iters=12, quiet=True,
    ))
