"""What training and the quickstart print: nothing with --quiet, and a closing statement worth reading."""

import json
from pathlib import Path

import pytest

from kimchi_edge.cli import main


@pytest.mark.slow
def test_quiet_prints_nothing_and_all_layers_schedule_works(kimchi_tree, tmp_path, capfd):
    """``--quiet``: no bars, no lines, no warnings (fd-level capture); ``--freeze-epochs 0`` as the quickstart runs it."""
    out = tmp_path / "q"
    rc = main(["train", str(kimchi_tree), "--out", str(out), "--arch", "efficientnet_lite0", "--item-size", "32",
               "--size", "32", "--no-flip", "--augment", "0", "--freeze-epochs", "0", "--lr-mult", "1", "--epochs", "1",
               "--no-lr-find", "--lr", "1e-3", "--bs", "16", "--max-images-per-class", "12", "--quiet"])
    captured = capfd.readouterr()
    assert rc == 0
    assert captured.out == "" and captured.err == ""
    history = json.loads((out / "reports" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["unfrozen"]
    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert metrics["test"] is None and metrics["n_test"] == 0
    assert json.loads((out / "split.json").read_text(encoding="utf-8"))["test"] == []
    assert (out / "model_meta.json").is_file() and not (out / "reports" / "lr_find.png").exists()


def _gate(int8_status: str = "pass") -> dict:
    return {"passed": True, "images": 359, "artifacts": {
        "torchscript": {"status": "pass", "agreement": 1.0, "top1": 0.98, "delta": 0.0},
        "onnx-fp32": {"status": "pass", "agreement": 1.0, "top1": 0.98, "delta": 0.0},
        "onnx-int8": {"status": int8_status, "agreement": 0.9944, "top1": 0.975, "delta": -0.0056},
    }}


def test_quickstart_closes_with_what_was_proven_and_what_next():
    from kimchi_edge.train.quickstart_cli import summary_lines

    metrics = {"accuracy": 0.9812, "test": {"accuracy": 0.9722}}
    lines = summary_lines(metrics, _gate(), Path("runs/quickstart/bundle"), 171.4)
    assert len(lines) == 2
    assert "98.1% validation / 97.2% test accuracy" in lines[0]
    assert "359 validation images" in lines[0]
    assert "torchscript 100.0%" in lines[0] and "onnx-fp32 100.0%" in lines[0] and "onnx-int8 99.4%" in lines[0]
    assert "171 s" in lines[0]
    assert lines[1].startswith("Next: kimchi-edge demo runs/quickstart/bundle")


def test_quickstart_says_when_an_artifact_failed():
    from kimchi_edge.train.quickstart_cli import summary_lines

    lines = summary_lines({"accuracy": 0.98, "test": None}, _gate("fail"), Path("b"), 60)
    assert "onnx-int8 99.4% FAILED, not used" in lines[0]
    assert "test" not in lines[0].split(";")[0]


def test_quickstart_says_an_engine_is_not_used_without_calling_the_artifact_failed():
    from kimchi_edge.train.quickstart_cli import summary_lines

    gate = _gate()
    gate["artifacts"]["onnx-int8 @ openvino"] = {"status": "fail", "agreement": 0.3816}
    gate["artifacts"]["onnx-fp32 @ openvino"] = {"status": "pass", "agreement": 1.0}
    line = summary_lines({"accuracy": 0.98, "test": None}, gate, Path("b"), 60)[0]
    assert "onnx-int8 on openvino 38.2%, so openvino is not used for it" in line
    assert "FAILED" not in line and "onnx-fp32 @ openvino" not in line


def test_an_existing_run_folder_is_refused_before_torch_or_fastai_is_imported(tmp_path):
    """The one-line error comes at once: the check needs neither torch nor fastai (importing them takes seconds)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys; from kimchi_edge.cli import main; rc = main(['train', sys.argv[1], '--out', sys.argv[2]]); "
            "print(rc, 'torch' in sys.modules, 'fastai' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(out)], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False", "False"], (r.stdout, r.stderr)
    assert f"{out} already exists; choose another --out or pass --overwrite" in r.stderr
