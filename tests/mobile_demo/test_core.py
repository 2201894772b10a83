"""The demo's logic without Streamlit: configuration, one image in, live throttling."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kimchi_edge.mobile_demo.core import (
    DEFAULT_BUNDLE,
    ENV_BACKEND,
    ENV_BUNDLE,
    ENV_ICE_SERVERS,
    DemoConfig,
    LivePredictor,
    bundle_facts,
    classify_image,
    format_timings,
    gate_summary,
    parse_ice_servers,
    warm_up,
)
from kimchi_edge.runtime import Classifier
from kimchi_edge.runtime.errors import InvalidInputError, UsageError

from . import images


@pytest.fixture(scope="module")
def clf(color_bundle):
    with Classifier.from_bundle(color_bundle, backend="onnxruntime", threads=1) as c:
        yield c


# --------------------------------------------------------------------------- configuration


def test_ice_servers_default_is_lan_only():
    assert parse_ice_servers(None) == []
    assert parse_ice_servers("none") == []
    assert parse_ice_servers("auto") is None


def test_ice_servers_urls_json_and_file(tmp_path):
    assert parse_ice_servers("stun:10.0.0.2:3478, turn:10.0.0.2:3478") == [{"urls": ["stun:10.0.0.2:3478", "turn:10.0.0.2:3478"]}]
    turn = [{"urls": "turn:10.0.0.2:3478", "username": "u", "credential": "p"}]
    assert parse_ice_servers(json.dumps(turn)) == turn
    assert parse_ice_servers(json.dumps({"iceServers": turn})) == turn
    f = tmp_path / "ice.json"
    f.write_text(json.dumps(turn), encoding="utf-8")
    assert parse_ice_servers(str(f)) == turn


@pytest.mark.parametrize("bad, expected", [
    ("http://stun.example", "not a stun:/turn: URL"),
    ("[{\"username\": \"u\"}]", "expected a list like"),
    ("{not json", "not valid JSON"),
])
def test_ice_servers_refuses_bad_values(bad, expected):
    with pytest.raises(UsageError, match=expected):
        parse_ice_servers(bad)


def test_config_defaults_to_quickstart_bundle_relative_to_cwd(tmp_path):
    cfg = DemoConfig.load([], {}, cwd=tmp_path)
    assert cfg.bundle == tmp_path / DEFAULT_BUNDLE
    assert not cfg.bundle_given
    assert cfg.backend == "auto"
    assert cfg.rtc_configuration == {"iceServers": []}


def test_config_script_args_override_environment(tmp_path):
    env = {ENV_BUNDLE: "/env/bundle", ENV_BACKEND: "onnxruntime", ENV_ICE_SERVERS: "auto"}
    cfg = DemoConfig.load([], env, cwd=tmp_path)
    assert cfg.bundle == Path("/env/bundle") and cfg.bundle_given and cfg.backend == "onnxruntime"
    assert cfg.rtc_configuration is None
    cfg = DemoConfig.load(["--bundle", "b", "--ice-servers", "stun:h:1"], env, cwd=tmp_path)
    assert cfg.bundle == tmp_path / "b"
    assert cfg.rtc_configuration == {"iceServers": [{"urls": ["stun:h:1"]}]}


def test_config_runs_gated_artifacts_only_unless_allowed(tmp_path):
    assert DemoConfig.load([], {}, cwd=tmp_path).allow_ungated is False
    assert DemoConfig.load([], {"KIMCHI_EDGE_ALLOW_UNGATED": "0"}, cwd=tmp_path).allow_ungated is False
    assert DemoConfig.load([], {"KIMCHI_EDGE_ALLOW_UNGATED": "1"}, cwd=tmp_path).allow_ungated is True
    assert DemoConfig.load(["--allow-ungated"], {}, cwd=tmp_path).allow_ungated is True


def test_config_bad_ice_setting_falls_back_and_says_why(tmp_path):
    cfg = DemoConfig.load([], {ENV_ICE_SERVERS: "http://nope"}, cwd=tmp_path)
    assert cfg.ice_servers == [] and "not a stun:/turn: URL" in cfg.ice_error


# --------------------------------------------------------------------------- one image


@pytest.mark.parametrize("data, label, mode_word", [
    (images.jpeg(images.RED), "빨강 red", None),
    (images.png_rgba((0, 0, 255, 128)), "파랑 blue", "RGBA"),  # composited on white: (127, 127, 255)
    (images.jpeg_cmyk((0, 255, 255, 0)), "빨강 red", "CMYK"),
    (images.gif_palette(images.GREEN), "초록 green", "palette"),
], ids=["rgb-jpeg", "rgba-png", "cmyk-jpeg", "palette-gif"])
def test_colour_modes_are_converted_and_classified(clf, data, label, mode_word):
    r = classify_image(clf, data, "x", top_k=3)
    assert r.ok, r.error
    assert r.prediction.label == label
    assert [lab for lab, _ in r.prediction.top][0] == label and len(r.prediction.top) == 3
    assert r.preview is not None and max(r.preview.size) <= 480
    if mode_word:
        from kimchi_edge.mobile_demo.core import describe_mode

        assert mode_word in describe_mode(r.source_mode)


def test_16bit_greyscale_is_scaled_not_clipped(clf):
    r = classify_image(clf, images.png_16bit_grey(), "grey16.png", top_k=3)
    assert r.ok, r.error
    assert r.source_mode.startswith("I")
    # grey: all three colours equally likely (not a saturated white or a black from clipping)
    assert np.allclose(r.prediction.probabilities, 1 / 3, atol=1e-3)


@pytest.mark.parametrize("data, expected", [
    (b"hello, not an image", ["notes.jpg", "is not an image"]),
    (b"", ["notes.jpg: the file is empty (0 bytes)"]),
    (images.truncated_jpeg(), ["damaged or truncated"]),
    (images.huge_png_header(), ["20000x20000", "over the limit"]),  # refused from the header, never decoded
], ids=["text", "empty", "truncated-jpeg", "huge-png"])
def test_bad_files_give_one_line_message(clf, data, expected):
    r = classify_image(clf, data, "notes.jpg")
    assert not r.ok and r.prediction is None
    assert all(part in r.error for part in expected), r.error
    assert r.error.startswith("notes.jpg")
    assert "\n" not in r.error


def test_unexpected_decoder_failure_is_reported_not_raised(clf, monkeypatch):
    def boom(*a, **k):
        raise EOFError("plug-in ran off the end")

    monkeypatch.setattr("kimchi_edge.mobile_demo.core.decode_image", boom)
    r = classify_image(clf, images.jpeg(images.RED), "odd.tif")
    assert r.error == "odd.tif: could not be read as an image (EOFError: plug-in ran off the end)"


def test_timings_and_facts(clf):
    r = classify_image(clf, images.jpeg(images.BLUE), "b.jpg")
    text = format_timings(r.prediction.timings_ms)
    assert [part.split()[0] for part in text.split(" · ")] == ["decode", "preprocess", "inference", "total"]
    facts = bundle_facts(clf)
    assert facts["labels"] == ["빨강 red", "초록 green", "파랑 blue"]
    assert facts["input_size"] == "32×32"
    assert facts["backend"].startswith("onnxruntime (CPUExecutionProvider) · onnx-fp32")
    assert facts["gate_short"] == "gate passed"  # the shared colour bundle is gated for real


def test_gate_summary_in_words_from_the_typed_manifest_entry():
    from kimchi_edge.runtime.manifest import GateSummary, _build

    assert gate_summary(None)[0].startswith("no accuracy gate report")
    summary = _build(GateSummary, {  # what convert's gate writes into manifest.gate
        "passed": False, "created": "2026-01-01T00:00:00Z", "report": "gate.md", "images": 200,
        "reference_top1": 0.915, "thresholds": {"max_loss_points": 0.5},
        "artifacts": {"onnx-fp32": {"status": "pass"}, "onnx-int8": {"status": "fail", "reason": "loses 5.30 points > 1"},
                      "torchscript": {"status": "skipped", "reason": "torch is not installed here"}},
        "notes": ["INT8 failed the gate; recommending FP32"],
    }, "gate")
    head, lines = gate_summary(summary)
    assert head == "gate FAILED"
    assert lines[0] == "Accuracy gate FAILED on 200 validation images, the fastai learner got 91.5% of them right."
    assert lines[1:] == ["onnx-fp32: passed", "onnx-int8: failed: loses 5.30 points > 1",
                         "torchscript: not scored: torch is not installed here"]
    assert not any("reference_top1" in line or "thresholds" in line for line in lines)  # no raw keys


class _Recording:
    """A classifier that records what it is asked to predict (and answers with the real one)."""

    def __init__(self, clf, fail: Exception | None = None):
        self.clf, self.fail, self.seen = clf, fail, []
        self.preprocessor = clf.preprocessor

    def predict(self, data, top_k=3):
        self.seen.append(data)
        if self.fail:
            raise self.fail
        return self.clf.predict(data, top_k=top_k)


def test_warm_up_sends_an_encoded_photo_through_the_whole_path(clf):
    rec = _Recording(clf)
    result = warm_up(rec)
    assert result.ok, result.error
    (data,) = rec.seen
    assert isinstance(data, bytes) and data[:3] == b"\xff\xd8\xff"  # JPEG bytes: the decode is warmed up too
    assert result.source_size == (640, 480) and result.preview is not None  # the preview path ran as for a photo
    assert {"decode", "preprocess", "infer"} <= set(result.prediction.timings_ms)


def test_warm_up_failure_is_logged_not_raised(clf, caplog):
    result = warm_up(_Recording(clf, fail=InvalidInputError("got shape (1, 3, 200, 200); expected (N, 32, 32, 3)")))
    assert not result.ok and "expected (N, 32, 32, 3)" in result.error
    assert "warm-up prediction failed" in caplog.text


# --------------------------------------------------------------------------- live


class FakeFrame:
    def __init__(self, rgb):
        self.rgb = rgb
        self.conversions = 0

    def to_ndarray(self, format):
        assert format == "rgb24"
        self.conversions += 1
        return self.rgb


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_live_never_waits_for_the_model():
    release = threading.Event()
    started = threading.Event()

    def slow_classify(rgb):
        started.set()
        release.wait(10)
        return "done"

    lp = LivePredictor(slow_classify, max_rate=100)
    frame = FakeFrame(np.zeros((8, 8, 3), np.uint8))
    assert lp.on_frame(frame) is frame
    assert started.wait(5)
    # the model is busy: frames keep flowing and are neither converted nor queued
    for _ in range(50):
        assert lp.on_frame(frame) is frame
    assert frame.conversions == 1
    release.set()
    assert lp.wait_idle(5)
    assert lp.status().prediction == "done" and lp.status().frames == 51
    lp.close()


def test_live_throttles_to_max_rate_and_reuses_last_result():
    clock = FakeClock()
    calls = []
    lp = LivePredictor(lambda rgb: calls.append(clock.t) or f"p{len(calls)}", max_rate=4, clock=clock)
    frame = FakeFrame(np.zeros((8, 8, 3), np.uint8))
    for _ in range(60):  # 2 s of 30 fps video
        lp.on_frame(frame)
        assert lp.wait_idle(5)
        clock.t += 1 / 30
    assert 7 <= len(calls) <= 9  # ~4 per second
    assert all(b - a >= 0.25 - 1e-9 for a, b in zip(calls, calls[1:], strict=False))
    s = lp.status()
    assert s.prediction == f"p{len(calls)}" and s.frames == 60
    assert 29 <= s.video_fps <= 31
    clock.t += 10  # the stream stopped: rates drop to 0, the last result stays
    assert lp.status().video_fps == 0 and lp.status().prediction == s.prediction
    lp.close()


def test_live_error_is_shown_and_stream_survives():
    def failing(rgb):
        raise InvalidInputError("got an array of shape (8, 8, 4); expected (height, width, 3) RGB")

    lp = LivePredictor(failing, max_rate=100)
    lp.on_frame(FakeFrame(np.zeros((8, 8, 4), np.uint8)))
    assert lp.wait_idle(5)
    s = lp.status()
    assert s.prediction is None and "expected (height, width, 3) RGB" in s.error
    lp.close()
    assert lp.on_frame("frame") == "frame"  # closed: frames still pass through untouched


def test_live_with_real_classifier(clf):
    lp = LivePredictor(lambda rgb: clf.predict(rgb, top_k=2), max_rate=100)
    lp.on_frame(FakeFrame(np.full((48, 64, 3), images.GREEN, np.uint8)))
    assert lp.wait_idle(10)
    s = lp.status()
    assert s.prediction.label == "초록 green" and len(s.prediction.top) == 2
    lp.close()


def test_error_message_puts_the_file_name_first():
    from kimchi_edge.mobile_demo.core import _message

    assert _message("a.jpg", "12345 bytes is not an image") == "a.jpg (12,345 bytes) is not an image"
    assert _message("a.jpg", "image is 0x0 pixels") == "a.jpg: image is 0x0 pixels"
