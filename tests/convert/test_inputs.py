"""Bad input to convert/verify: one clear line, a non-zero exit, nothing written (no trained model needed)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from kimchi_edge.cli import main
from kimchi_edge.runtime.errors import BundleError, DataError, UsageError
from kimchi_edge.runtime.fsutil import atomic_write_json
from kimchi_edge.runtime.manifest import Preprocessing, to_dict

from .conftest import write_colour_photos

LABELS = ("빨강 red", "초록 green", "파랑 blue")


def make_run(folder: Path, data_root: Path, *, labels=LABELS, learner: bytes | None = b"", n_train: int | None = None) -> Path:
    """A run folder with real split.json/model_meta.json over ``data_root`` and an arbitrary learner.pkl."""
    folder.mkdir(parents=True, exist_ok=True)
    pre = Preprocessing(height=32, width=32, resize_height=40, resize_width=40, batch_resize=True)
    meta = {"labels": list(labels), "architecture": "resnet18", "preprocessing": to_dict(pre)}
    atomic_write_json(folder / "model_meta.json", meta)
    items = {s: [{"file": p.relative_to(data_root).as_posix(), "label": p.parent.name}
                 for p in sorted((data_root / s).rglob("*.*"))] for s in ("train", "valid")}
    if n_train is not None:
        items["train"] = items["train"][:n_train]
    atomic_write_json(folder / "split.json", {"data_root": str(data_root), "layout": "given", "seed": 42, "valid_pct": None,
                                              "vocab": list(labels), **items, "excluded": []})
    if learner is not None:
        (folder / "learner.pkl").write_bytes(learner)
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_colour_photos(tmp_path_factory.mktemp("small") / "data", {"train": 4, "valid": 3})


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("kimchi-edge")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- run folder / data


def test_missing_run_folder_exits_2(capsys, tmp_path):
    code, err = run_cli(capsys, "convert", str(tmp_path / "nope"))
    assert code == 2
    assert "does not exist" in error_line(err)


def test_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "convert", str(tmp_path))
    assert code == 2 and "not a kimchi-edge run folder" in error_line(err)


def test_class_list_of_one_is_refused_before_loading(capsys, tmp_path, small_data):
    run = make_run(tmp_path / "run", small_data, labels=("빨강 red",), learner=None)
    code, err = run_cli(capsys, "convert", str(run))
    assert code == 1
    assert "at least 2 labels" in error_line(err)
    assert not (run / "bundle").exists()


def test_moved_validation_images_are_listed_with_the_fix(capsys, tmp_path, small_data):
    run = make_run(tmp_path / "run", small_data, learner=None)
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    split["data_root"] = str(tmp_path / "moved-away")
    atomic_write_json(run / "split.json", split)
    code, err = run_cli(capsys, "convert", str(run))
    line = error_line(err)
    assert code == 2
    assert "9 of 9 validation images are missing" in line and "--data NEW_ROOT" in line
    assert "valid/빨강 red/000.png" in line  # names the files, Korean intact
    assert not (run / "bundle").exists()


def test_calibration_count_larger_than_train_split(capsys, tmp_path, small_data):
    run = make_run(tmp_path / "run", small_data, learner=None)
    code, err = run_cli(capsys, "convert", str(run), "--calib", "13")
    line = error_line(err)
    assert code == 2
    assert "--calib 13 is larger than the training split (12 images)" in line
    assert not (run / "bundle").exists()


def test_out_folder_that_is_not_a_bundle_is_not_replaced(capsys, tmp_path, small_data):
    run = make_run(tmp_path / "run", small_data, learner=None)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete", encoding="utf-8")
    code, err = run_cli(capsys, "convert", str(run), "--out", str(precious))
    assert code == 2 and "is not a kimchi-edge bundle" in error_line(err)
    assert (precious / "thesis.txt").read_text(encoding="utf-8") == "do not delete"


def test_stratified_calibration_sample():
    from kimchi_edge.convert.runfolder import Item, stratified_sample

    items = [Item(f"a/{i}", "a") for i in range(60)] + [Item(f"b/{i}", "b") for i in range(30)] + [Item(f"c/{i}", "c") for i in range(10)]
    sample = stratified_sample(items, 20, ["a", "b", "c"], seed=1)
    counts = {lab: sum(1 for it in sample if it.label == lab) for lab in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}
    assert len(set(sample)) == 20
    assert sample == stratified_sample(items, 20, ["a", "b", "c"], seed=1)  # deterministic
    tiny = stratified_sample(items, 3, ["a", "b", "c"])
    assert {it.label for it in tiny} == {"a", "b", "c"}  # every class represented
    with pytest.raises(UsageError, match="larger than the training split"):
        stratified_sample(items, 101, ["a", "b", "c"])
    with pytest.raises(UsageError, match="at least 1"):
        stratified_sample(items, 0, ["a", "b", "c"])


# --------------------------------------------------------------------------- learner.pkl


def test_missing_learner(capsys, tmp_path, small_data):
    run = make_run(tmp_path / "run", small_data, learner=None)
    code, err = run_cli(capsys, "convert", str(run))
    assert code == 2 and "no learner at" in error_line(err)
    assert not (run / "bundle").exists()


def test_corrupt_learner(capsys, tmp_path, small_data):
    pytest.importorskip("fastai")
    run = make_run(tmp_path / "run", small_data, learner=b"PK\x03\x04 this is not a learner" * 10)
    code, err = run_cli(capsys, "convert", str(run))
    line = error_line(err)
    assert code == 2 and "not a readable fastai learner" in line
    assert not (run / "bundle").exists()


def test_empty_learner(tmp_path):
    from kimchi_edge.convert.errors import LearnerError
    from kimchi_edge.convert.learner_io import load_learner

    (tmp_path / "learner.pkl").write_bytes(b"")
    with pytest.raises(LearnerError, match="empty"):
        load_learner(tmp_path)


def _pickle_needing(tmp_path: Path, name: str) -> Path:
    """A torch pickle that refers to ``__main__.<name>``, as a learner exported from a notebook does."""
    import torch

    main_mod = sys.modules["__main__"]

    def fn(path):  # pragma: no cover - never called
        return "label"

    fn.__module__, fn.__qualname__, fn.__name__ = "__main__", name, name
    setattr(main_mod, name, fn)
    try:
        torch.save({"get_y": fn}, tmp_path / "learner.pkl", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    finally:
        delattr(main_mod, name)
    return tmp_path / "learner.pkl"


def test_learner_needing_a_function_not_in_scope_names_it(capsys, tmp_path, small_data):
    pytest.importorskip("fastai")
    run = make_run(tmp_path / "run", small_data, learner=None)
    _pickle_needing(run, "label_from_filename")
    code, err = run_cli(capsys, "convert", str(run))
    line = error_line(err)
    assert code == 2
    assert "'label_from_filename'" in line and "--import" in line
    assert not (run / "bundle").exists()


def test_import_option_makes_the_function_available(tmp_path):
    pytest.importorskip("fastai")
    from kimchi_edge.convert.errors import LearnerError
    from kimchi_edge.convert.learner_io import load_learner

    path = _pickle_needing(tmp_path, "label_from_parent")
    helper = tmp_path / "labelling.py"
    helper.write_text("def label_from_parent(path):\n    return path.parent.name\n", encoding="utf-8")
    try:
        # now it unpickles, and the next check speaks: it is a dict, not a Learner
        with pytest.raises(LearnerError, match="holds a dict, not a fastai Learner"):
            load_learner(path, imports=[str(helper)])
    finally:
        if hasattr(sys.modules["__main__"], "label_from_parent"):
            delattr(sys.modules["__main__"], "label_from_parent")


def test_learner_needing_a_missing_module(tmp_path):
    pytest.importorskip("fastai")
    import torch

    from kimchi_edge.convert.errors import LearnerError
    from kimchi_edge.convert.learner_io import load_learner

    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "kimchi_gone_module.py").write_text("def f(x):\n    return x\n", encoding="utf-8")
    sys.path.insert(0, str(mod_dir))
    try:
        import kimchi_gone_module

        torch.save({"f": kimchi_gone_module.f}, tmp_path / "learner.pkl")
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("kimchi_gone_module", None)
    with pytest.raises(LearnerError, match="needs the module 'kimchi_gone_module'"):
        load_learner(tmp_path / "learner.pkl")


# --------------------------------------------------------------------------- verify on a non-bundle


def test_verify_missing_bundle(capsys, tmp_path):
    code, err = run_cli(capsys, "verify", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in error_line(err)


def test_verify_unknown_threshold_value(capsys, tmp_path):
    code, err = run_cli(capsys, "verify", str(tmp_path), "--min-agreement", "150")
    assert code == 2 and "percentage" in error_line(err)


def test_read_run_vocab_mismatch(tmp_path, small_data):
    from kimchi_edge.convert.runfolder import read_run

    run = make_run(tmp_path / "run", small_data, learner=None)
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    split["vocab"] = list(reversed(split["vocab"]))
    atomic_write_json(run / "split.json", split)
    with pytest.raises(BundleError, match="differs from model_meta.json labels"):
        read_run(run)


def test_resolve_images_remaps_root(tmp_path, small_data):
    from kimchi_edge.convert.runfolder import read_run, resolve_images

    run = read_run(make_run(tmp_path / "run", small_data, learner=None))
    with pytest.raises(DataError, match="--images NEW_ROOT"):
        resolve_images(run.valid, tmp_path / "elsewhere", option="--images")
    assert all(p.is_file() for p in resolve_images(run.valid, small_data))
