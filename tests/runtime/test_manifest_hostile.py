"""Hostile manifests: file names that leave the bundle, wrong types.  Refused with one line, before anything is opened."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from kimchi_edge.runtime import BundleError, Classifier
from kimchi_edge.runtime.manifest import read_manifest


def _copy_with(color_bundle, tmp_path, edit) -> object:
    copy = tmp_path / "b"
    shutil.copytree(color_bundle, copy)
    doc = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    edit(doc)
    (copy / "manifest.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return copy


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "sub/../../x.onnx", "C:\\\\x.onnx", "..", ""])
def test_artifact_file_outside_the_bundle_is_refused_before_open(color_bundle, tmp_path, monkeypatch, name):
    import kimchi_edge.runtime.fsutil as fsutil

    copy = _copy_with(color_bundle, tmp_path, lambda d: d["artifacts"][0].update(file=name))
    opened = []
    monkeypatch.setattr(fsutil, "sha256_file", lambda p, *a, **k: opened.append(p) or "0" * 64)
    with pytest.raises(BundleError, match=r"artifacts\[0\]|artifact 'onnx-fp32'") as exc:
        Classifier.from_bundle(copy)
    assert "\n" not in str(exc.value) and opened == []


def test_symlink_out_of_the_bundle_is_refused(color_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(color_bundle, copy)
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "model.onnx", outside)
    os.symlink(outside, copy / "model.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        Classifier.from_bundle(copy)


@pytest.mark.parametrize("field,value,where", [
    (("model", "preprocessing", "height"), "224", "manifest.model.preprocessing.height: expected a whole number"),
    (("model", "preprocessing", "mean"), "0.5", "manifest.model.preprocessing.mean: expected a list"),
    (("model", "labels"), [1, 2, 3], "manifest.model.labels[0]: expected text"),
    (("artifacts",), {"a": 1}, "manifest.artifacts: expected a list"),
    (("model", "preprocessing", "batch_resize"), "yes", "manifest.model.preprocessing.batch_resize: expected true or false"),
])
def test_wrong_types_name_the_field(color_bundle, tmp_path, field, value, where):
    def edit(doc):
        node = doc
        for key in field[:-1]:
            node = node[key]
        node[field[-1]] = value

    copy = _copy_with(color_bundle, tmp_path, edit)
    with pytest.raises(BundleError) as exc:
        read_manifest(copy)
    assert str(exc.value).startswith(where), str(exc.value)
