"""Small real datasets for the training tests, built from the bundled digits (no download)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Korean, a space, mixed case: class names must survive exactly.
KIMCHI_CLASSES = {"0 영": "배추김치", "1 일": "오이 소박이", "7 칠": "Pa Kimchi"}
EXTS = [".png", ".PNG", ".Png"]
REPO = Path(__file__).resolve().parents[2]

#: Runs the CLI with the third-party warnings the training output must not show turned into errors.
STRICT_WARNINGS_MAIN = (
    "import sys, warnings\n"
    "from sklearn.exceptions import UndefinedMetricWarning\n"
    "warnings.simplefilter('error', FutureWarning)\n"
    "warnings.simplefilter('error', UndefinedMetricWarning)\n"
    "from kimchi_edge.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def build_tree(digits: Path, out: Path, per_class: int, given_split: bool = False, test_split: bool = False) -> Path:
    """Copy ``per_class`` digit images of three classes under kimchi names; mixed-case extensions.

    ``given_split``: every 4th image goes to ``valid/``; ``test_split`` also every 4th+1 to ``test/``.
    """
    for src_label, name in KIMCHI_CLASSES.items():
        files = sorted((digits / src_label).glob("*.png"))[:per_class]
        for i, f in enumerate(files):
            split = None
            if given_split:
                split = "valid" if i % 4 == 0 else ("test" if test_split and i % 4 == 1 else "train")
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


@dataclass(frozen=True)
class CliRun:
    run: Path
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture(scope="session")
def tiny_cli(kimchi_tree, tmp_path_factory) -> CliRun:
    """One real training run through the CLI, in its own process (so fastai is imported afresh), with
    FutureWarning and sklearn's UndefinedMetricWarning as errors, ``--json`` and ``--test-pct``.

    EfficientNet-Lite0 with its shipped ImageNet weights, 32 px, 1 frozen + 1 unfrozen epoch, lr_find
    with the scaled default number of iterations.
    """
    out = tmp_path_factory.mktemp("runs") / "tiny"
    args = ["train", str(kimchi_tree), "--out", str(out), "--arch", "efficientnet_lite0", "--item-size", "40", "--size", "32",
            "--no-flip", "--epochs", "1", "--freeze-epochs", "1", "--bs", "16", "--test-pct", "0.2", "--json"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-c", STRICT_WARNINGS_MAIN, *args], capture_output=True, text=True, check=False,
                          encoding="utf-8", timeout=900, cwd=REPO, env=env)
    return CliRun(out, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def tiny_run(tiny_cli) -> Path:
    """The run folder of :func:`tiny_cli` (which must have succeeded)."""
    assert tiny_cli.returncode == 0, tiny_cli.stderr[-3000:]
    return tiny_cli.run
