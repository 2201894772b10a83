import json
import shutil

import pytest
from kimchi_edge.train.data import scan_dataset

from kimchi_edge.cli import main
from tests.train.conftest import KIMCHI_CLASSES, build_tree


def test_random_layout_korean_names_and_screening(kimchi_tree):
    scan = scan_dataset(kimchi_tree)
    assert scan.layout == "random"
    assert scan.classes == sorted(KIMCHI_CLASSES.values())
    assert "오이 소박이" in scan.classes and "Pa Kimchi" in scan.classes
    excluded = {e["file"]: e for e in scan.excluded}
    assert set(excluded) == {"배추김치/broken.jpg", "오이 소박이/notes.jpg"}
    assert "damaged or truncated" in excluded["배추김치/broken.jpg"]["reason"]
    assert "not an image" in excluded["오이 소박이/notes.jpg"]["reason"]
    files = {f.name for f, _ in scan.train}
    assert any(n.endswith(".PNG") for n in files) and any(n.endswith(".Png") for n in files)
    assert "README.txt" not in files and "broken.jpg" not in files
    assert len(scan.train) == 90


def test_given_layout(digits, tmp_path):
    root = build_tree(digits, tmp_path / "d", per_class=8, given_split=True)
    scan = scan_dataset(root)
    assert scan.layout == "given"
    assert len(scan.valid) == 6 and len(scan.train) == 18
    assert {lab for _, lab in scan.valid} == set(KIMCHI_CLASSES.values())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no class folders"),
        (lambda p: (p / "only").mkdir(parents=True) or (p / "only" / "a.png").write_bytes(b"x"), "single class"),
        (lambda p: [(p / c).mkdir(parents=True) for c in ("a", "b")], "has no images"),
    ],
    ids=["missing", "empty", "single-class", "class-without-images"],
)
def test_bad_data_exits_2_and_writes_nothing(tmp_path, capsys, make, message):
    data = tmp_path / "data"
    make(data)
    out = tmp_path / "run"
    rc = main(["train", str(data), "--out", str(out), "--arch", "efficientnet_lite0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_single_class_after_screening(tmp_path, capsys, digits):
    data = tmp_path / "d"
    build_tree(digits, data, per_class=3)
    for f in (data / "배추김치").iterdir():
        f.write_bytes(b"garbage")
    rc = main(["train", str(data), "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 2
    assert "배추김치" in capsys.readouterr().err


def test_sample_is_real_digits(digits):
    from kimchi_edge.train.sample import SAMPLE_LABELS
    from PIL import Image

    assert sorted(p.name for p in digits.iterdir()) == sorted(SAMPLE_LABELS)
    im = Image.open(next((digits / "8 팔").glob("*.png")))
    assert im.size == (32, 32) and im.mode == "L"
    assert len(set(im.getdata())) > 5  # grey levels of a real scan, not a flat fill


def test_json_written_as_utf8_not_escaped(tiny_run):
    text = (tiny_run / "split.json").read_text(encoding="utf-8")
    assert "배추김치" in text and "\\ub" not in text
    assert json.loads(text)["vocab"] == sorted(KIMCHI_CLASSES.values())


def test_given_layout_with_test_folder(digits, tmp_path):
    root = build_tree(digits, tmp_path / "d", per_class=8, given_split=True, test_split=True)
    scan = scan_dataset(root)
    assert scan.layout == "given"
    assert (len(scan.train), len(scan.valid), len(scan.test)) == (12, 6, 6)
    assert {lab for _, lab in scan.test} == set(KIMCHI_CLASSES.values())
    assert all("/test/" in f.as_posix() for f, _ in scan.test)


def test_train_and_test_without_valid_is_refused(digits, tmp_path):
    from kimchi_edge.runtime.errors import DataError

    root = build_tree(digits, tmp_path / "d", per_class=8, given_split=True, test_split=True)
    shutil.rmtree(root / "valid")
    with pytest.raises(DataError, match="no valid/"):
        scan_dataset(root)


def test_hold_out_test_is_per_class_seeded_and_disjoint(kimchi_tree):
    from kimchi_edge.train.data import hold_out_test

    a = hold_out_test(scan_dataset(kimchi_tree), 0.2, seed=42)
    b = hold_out_test(scan_dataset(kimchi_tree), 0.2, seed=42)
    c = hold_out_test(scan_dataset(kimchi_tree), 0.2, seed=7)
    assert [f for f, _ in a.test] == [f for f, _ in b.test]  # same seed, same files
    assert [f for f, _ in a.test] != [f for f, _ in c.test]
    counts = {lab: sum(1 for _, l in a.test if l == lab) for lab in KIMCHI_CLASSES.values()}
    assert counts == {lab: 6 for lab in KIMCHI_CLASSES.values()}  # 20 % of each class's 30 readable images
    assert not {f for f, _ in a.test} & {f for f, _ in a.train}
    assert len(a.train) + len(a.test) == 90


def test_test_pct_with_a_test_folder_is_refused(digits, tmp_path, capsys):
    root = build_tree(digits, tmp_path / "d", per_class=8, given_split=True, test_split=True)
    rc = main(["train", str(root), "--out", str(tmp_path / "r"), "--arch", "efficientnet_lite0", "--test-pct", "0.1", "--quiet"])
    assert rc == 2
    assert "test/ folder already" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("n_train, bs, expected", [(54, 16, 30), (1438, 32, 88), (1438, 64, 44), (244, 64, 30), (20000, 64, 100)])
def test_lr_find_iterations_are_about_two_epochs(n_train, bs, expected):
    from kimchi_edge.train.api import lr_find_iterations

    assert lr_find_iterations(n_train, bs) == expected
    assert lr_find_iterations(n_train, bs, requested=7) == 7


def test_too_few_lr_find_iterations_is_a_usage_error_not_a_fastai_crash():
    # fastai's lr_find scores its suggestions on points [n//10 : n-5]; with 6 its `steep` raised IndexError
    from kimchi_edge.train.api import lr_find_iterations
    from kimchi_edge.runtime.errors import UsageError

    assert lr_find_iterations(100, 16, requested=7) == 7
    with pytest.raises(UsageError, match="at least 7"):
        lr_find_iterations(100, 16, requested=6)
