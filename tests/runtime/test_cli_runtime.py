"""``kimchi-edge predict`` / ``bench`` / ``serve`` as a user runs them: output, files, exit codes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from kimchi_edge.cli import main
from kimchi_edge.runtime.predict_cli import display_width, format_table
from tests.conftest import COLOR_LABELS

RED, GREEN, BLUE = COLOR_LABELS


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 48), (240, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (640, 480), (10, 10, 240)).save(folder / "blue.jpg", quality=90)
    Image.new("RGB", (30, 90), (10, 240, 10)).save(folder / "초록 사진.webp")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_display_width_counts_hangul_as_two_columns():
    assert display_width("빨강 red") == 8
    assert display_width("e\u0301") == 1  # combining accent takes no column
    table = format_table([["a", "빨강 red", "1.00%"], ["bb", "green", "99.00%"]], ["x", "label", "p"], "<<>")
    widths = {display_width(line) for line in table.splitlines()}
    assert len(widths) == 1, table  # right-aligned last column: every line ends at the same column


def test_predict_table(color_bundle, images, capsys):
    rc = main(["predict", str(color_bundle), str(images / "red.png"), str(images / "blue.jpg"), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["image", "#", "label", "probability"]
    assert lines[1].split()[1:4] == ["1", "빨강", "red"] and lines[1].startswith(str(images / "red.png"))
    assert lines[3].split()[1:4] == ["1", "파랑", "blue"]
    assert len(lines) == 5  # header + 2 images x top-2
    assert len({display_width(line) for line in lines}) == 1, out  # aligned despite the Korean labels
    assert "onnxruntime (CPUExecutionProvider), artifact onnx-fp32 (fp32): 2/2 images" in err


def test_predict_json_is_utf8_and_reports_bad_files(color_bundle, images, capsysbinary):
    rc = main(["predict", str(color_bundle), str(images), "--json", "--top-k", "1"])
    raw = capsysbinary.readouterr().out
    assert rc == 0  # a folder stands for its image files: notes.txt is not one of them
    doc = json.loads(raw.decode("utf-8"))
    assert "빨강 red".encode("utf-8") in raw  # not \\uXXXX escapes
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in doc["results"]}
    assert by_name["red.png"]["label"] == RED
    assert by_name["blue.jpg"]["label"] == BLUE
    assert by_name["초록 사진.webp"]["label"] == GREEN
    assert doc["backend"]["backend"] == "onnxruntime" and len(by_name["red.png"]["top"]) == 1
    assert len(by_name) == 3


def test_predict_bad_file_is_reported_and_others_still_classified(color_bundle, images, capsys):
    rc = main(["predict", str(color_bundle), str(images / "notes.txt"), str(images / "red.png")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "notes.txt: file" in err and "is not an image Pillow can decode" in err
    assert "빨강 red" in out and "1/2 images" in err


@pytest.mark.parametrize("argv, code, message", [
    (["predict", "{bundle}", "x.png", "--top-k", "0"], 2, "kimchi-edge predict: error: --top-k must be at least 1, got 0"),
    (["predict", "{missing}", "x.png"], 1, "does not exist; make one with: kimchi-edge convert RUN_DIR"),
    (["predict", "{bundle}", "x.png", "--artifact", "onnx-int8"], 1, "bundle has no artifact 'onnx-int8'; it has ['onnx-fp32']"),
    (["predict", "{bundle}", "x.png", "--backend", "tensorrt"], 1, "the bundle has no TensorRT engine"),
    (["bench", "{bundle}", "--images", "{missing}"], 2, "--images"),
    (["serve", "{bundle}", "--timeout", "0"], 2, "--timeout must be positive, got 0.0"),
])
def test_errors_are_one_line_with_exit_status(color_bundle, tmp_path, capsys, argv, code, message):
    argv = [a.format(bundle=color_bundle, missing=tmp_path / "missing") for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert err[0].startswith(f"kimchi-edge {argv[0]}: error: ")


def test_bad_arguments_exit_2(color_bundle, capsys):
    for argv in (["bench", str(color_bundle), "--batch-sizes", "1,x"], ["bench", str(color_bundle), "--iterations", "0"],
                 ["predict", str(color_bundle)], ["build-engine", str(color_bundle), "--fp16", "--int8"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "expected comma-separated positive integers like 1,8,32" in capsys.readouterr().err


def test_bench_writes_percentiles_stages_and_cold_start(color_bundle, images, tmp_path, capsys):
    rc = main(["bench", str(color_bundle), "--images", str(images), "--warmup", "1", "--iterations", "3",
               "--batch-sizes", "1,4", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "3 files from" in err and "skipping" not in err  # notes.txt is not an image suffix: never read
    assert "cold start (fresh process): import" in err and "peak RSS" in err  # --json: progress on stderr
    doc = json.loads(out)  # stdout is the JSON object alone
    assert [r["batch_size"] for r in doc["results"]] == [1, 4]
    for r in doc["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert set(r["stage_ms_per_image"]) == {"decode", "preprocess", "infer"}
        assert r["images_per_s"] > 0
    cold = doc["cold_start"]
    assert cold["label"] in COLOR_LABELS and cold["heavy_modules"] == []
    assert cold["peak_rss_mb"] > 10 and cold["import_ms"] > 0 and cold["load_ms"] > 0
    assert doc["backend"]["artifact"] == "onnx-fp32" and doc["iterations"] == 3


def test_bench_skips_unreadable_files_and_generates_an_image_without_images(color_bundle, images, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["bench", str(color_bundle), "--images", str(images), "--iterations", "1", "--warmup", "0",
                 "--batch-sizes", "2", "--no-cold-start"]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "broken.jpg" in err and "1 unreadable skipped" in out
    assert main(["bench", str(color_bundle), "--iterations", "1", "--warmup", "0", "--batch-sizes", "1", "--no-cold-start"]) == 0
    assert "1 generated photo-like 1280x960 JPEG" in capsys.readouterr().out


def test_generated_benchmark_image_is_deterministic_and_photo_sized():
    import io

    from kimchi_edge.runtime.bench_cli import photo_like_jpeg

    a, b = photo_like_jpeg(), photo_like_jpeg()
    assert a == b
    im = Image.open(io.BytesIO(a))
    assert im.format == "JPEG" and im.size == (1280, 960)
    assert 50_000 < len(a) < 2_000_000  # neither flat nor pure noise
