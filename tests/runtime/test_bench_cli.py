"""``kimchi-edge bench``: ``--json`` and ``--quiet`` behave as on the other commands; options of the other mode are refused."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from kimchi_edge.cli import main
from tests.conftest import COLOR_LABELS


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 48), (240, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (320, 240), (10, 10, 240)).save(folder / "blue.jpg", quality=90)
    return folder


FAST = ["--iterations", "2", "--warmup", "0", "--batch-sizes", "1,2"]


def test_json_prints_one_object_on_stdout_and_progress_on_stderr(color_bundle, images, capsysbinary):
    assert main(["bench", str(color_bundle), "--images", str(images), *FAST, "--json"]) == 0
    cap = capsysbinary.readouterr()
    doc = json.loads(cap.out.decode("utf-8"))  # the whole of stdout is one JSON object
    assert [r["batch_size"] for r in doc["results"]] == [1, 2]
    assert doc["cold_start"]["label"] in COLOR_LABELS and doc["iterations"] == 2 and doc["warmup"] == 0
    err = cap.err.decode("utf-8")
    assert "2 files from" in err and "cold start (fresh process)" in err and "p50 ms" not in err  # no table either


def test_quiet_prints_nothing(color_bundle, images, capsys):
    assert main(["bench", str(color_bundle), "--images", str(images), *FAST, "--no-cold-start", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_quiet_json_prints_the_json_only(color_bundle, images, capsys):
    assert main(["bench", str(color_bundle), "--images", str(images), *FAST, "--no-cold-start", "-q", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["cold_start"] is None


def test_default_output_is_the_table_on_stdout(color_bundle, images, capsys):
    assert main(["bench", str(color_bundle), "--images", str(images), *FAST, "--no-cold-start"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[1].startswith("images: 2 files from")
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["batch", "p50", "ms"])
    assert [line.split()[0] for line in lines[header + 1: header + 3]] == ["1", "2"]


@pytest.mark.parametrize("argv, message", [
    (["bench"], "give the BUNDLE folder to benchmark (or --compare RUN_DIR to compare it with fastai)"),
    (["bench", "{bundle}", "--rounds", "1"], "--rounds applies only with --compare RUN_DIR"),
    (["bench", "{bundle}", "--out", "x", "--no-experiments"], "--out, --no-experiments apply only with --compare RUN_DIR"),
    (["bench", "--compare", "{tmp}", "--images", "{tmp}", "--iterations", "3"],
     "--iterations applies only to kimchi-edge bench BUNDLE, not with --compare"),
    (["bench", "--compare", "{tmp}", "--images", "{tmp}", "--backend", "onnxruntime"], "--backend does not apply with --compare"),
    (["bench", "--compare", "{tmp}"], "--compare needs --images DIR"),
    (["bench", "--compare", "{tmp}", "--images", "{tmp}"], "learner.pkl not found (RUN_DIR must be a kimchi-edge train run folder)"),
    (["bench", "--compare", "{tmp}", "--images", "{tmp}", "--paths", "ort-fp32,onnx"], "--paths: unknown path(s) ['onnx']"),
])
def test_wrong_mode_options_are_one_line_usage_errors(color_bundle, tmp_path, capsys, argv, message):
    argv = [a.format(bundle=color_bundle, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("kimchi-edge bench: error: ") and message in err, err


def test_bad_phone_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--compare", "run", "--images", "x", "--phone-size", "3000"])
    assert exc.value.code == 2
    assert "expected WIDTHxHEIGHT like 3000x2250, got '3000'" in capsys.readouterr().err
