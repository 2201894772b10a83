"""``--quiet`` and ``--json`` mean the same on every command that produces a result (issue: they did not)."""

from __future__ import annotations

import argparse
import json

import pytest

from kimchi_edge.cli import build_parser, main

COMMANDS = ("train", "quickstart", "convert", "verify", "predict", "info", "bench", "build-engine")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_the_same_quiet_and_json(name):
    p = _subparser(name)
    opts = {o: a for a in p._actions for o in a.option_strings}
    if "rest" in {a.dest for a in p._actions}:
        pytest.skip(f"{name} is not available in this install (its extra is missing)")
    assert "--quiet" in opts and "-q" in opts and "--json" in opts, f"{name}: {sorted(opts)}"
    assert opts["--quiet"].help.startswith("print nothing but errors"), opts["--quiet"].help
    assert "one UTF-8 JSON object on stdout" in opts["--json"].help, opts["--json"].help


def test_info_json_is_one_object_and_quiet_is_silent(color_bundle, ungated_color_bundle, capsys):
    assert main(["info", str(color_bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["labels"] == ["빨강 red", "초록 green", "파랑 blue"]
    assert doc["gate"]["passed"] is True and doc["artifacts"][0]["gate"]["status"] == "pass"
    assert doc["verification"]["images"] == 9
    assert main(["info", str(ungated_color_bundle), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gate"] is None and doc["artifacts"][0]["gate"] is None
    assert main(["info", str(color_bundle), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_info_check_finds_a_modified_file(color_bundle, tmp_path, capsys):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(color_bundle, copy)
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"x")
    assert main(["info", str(copy), "--check"]) == 1
    assert "FILE MODIFIED/MISSING" in capsys.readouterr().out


def test_predict_quiet_prints_nothing_and_json_only_json(color_bundle, tmp_path, capsys):
    from tests.conftest import solid_image

    img = tmp_path / "red.png"
    solid_image((250, 10, 10)).save(img)
    assert main(["predict", str(color_bundle), str(img), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert main(["predict", str(color_bundle), str(img), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["results"][0]["top"][0]["label"] == "빨강 red" and out.err == ""
