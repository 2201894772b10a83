"""The gate's statistics and verdicts on hand-made numbers (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from kimchi_edge.convert.gate_policy import ArtifactResult, Thresholds, decide, embedded_mismatch, recommend
from kimchi_edge.convert.gate_stats import compare, paired_difference_interval, wilson_interval
from kimchi_edge.runtime.manifest import Artifact, BundleManifest, ModelMeta, Preprocessing, to_dict

LABELS = ("가", "나", "다")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_interval_is_honest_when_everything_agrees():
    same = np.r_[np.ones(150, bool), np.zeros(50, bool)]
    lo, hi = paired_difference_interval(same, same)
    assert lo == pytest.approx(-hi) and 0.015 < hi < 0.025  # ~ Wilson bound of 0/200, not [0, 0]
    cand = same.copy()
    cand[:3] = False  # the candidate loses 3 images
    lo, hi = paired_difference_interval(cand, same)
    assert lo < -0.015 < hi and hi < 0.01


def test_compare_metrics():
    ref = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    cand = np.array([[0.88, 0.07, 0.05], [0.2, 0.7, 0.1], [0.45, 0.3, 0.25], [0.6, 0.3, 0.1]])
    targets = np.array([0, 1, 2, 1])
    m = compare(ref, cand, targets, LABELS)
    assert m["agreement"] == 0.75 and m["disagreements"] == 1
    assert m["top1"] == 0.5 and m["delta"] == pytest.approx(-0.25)
    assert m["max_abs_dprob"] == pytest.approx(0.15)
    assert m["per_class"]["다"] == {"n": 1, "reference_top1": 1.0, "top1": 0.0, "delta": -1.0}
    assert m["per_class"]["나"]["n"] == 2


def _result(name: str, precision: str, agreement: float, delta: float) -> ArtifactResult:
    return ArtifactResult(name=name, format="onnx", precision=precision, status="",
                          metrics={"agreement": agreement, "delta": delta, "n": 1000, "disagreements": round((1 - agreement) * 1000)})


@pytest.mark.parametrize("precision, agreement, delta, status", [
    ("fp32", 0.996, -0.004, "pass"),
    ("fp32", 0.994, 0.0, "fail"),     # agreement below 99.5 %
    ("fp32", 0.999, -0.006, "fail"),  # loses 0.6 points
    ("fp16", 0.995, -0.005, "pass"),  # exactly at the limits
    ("int8", 0.95, -0.009, "fail"),   # INT8: within 1 point but agrees on only 95 % (< the 98 % floor)
    ("int8", 0.98, -0.010, "pass"),   # exactly at both INT8 limits
    ("int8", 0.99, -0.011, "fail"),   # agrees, but loses 1.1 points
])
def test_thresholds(precision, agreement, delta, status):
    r = _result("x", precision, agreement, delta)
    decide(r, Thresholds())
    assert r.status == status, r.reason


def test_int8_floor_is_configurable_and_in_the_reason():
    r = _result("onnx-int8", "int8", 0.976, 0.0)
    decide(r, Thresholds())
    assert r.status == "fail" and r.reason == "agreement 97.60% < 98%"
    decide(r, Thresholds(int8_min_agreement=0.97))
    assert r.status == "pass"
    decide(r, Thresholds(int8_min_agreement=0.977))  # raised past what the artifact reaches: fails again
    assert r.status == "fail"


def test_a_model_too_sensitive_for_int8_is_named_as_the_reason():
    from kimchi_edge.convert.gate_policy import jitter_note

    r = _result("onnx-int8", "int8", 0.82, -0.01)
    r.quantization = {"fp32_input_jitter": {"agreement": 0.94, "mean_abs_dprob": 0.02, "images": 50}}
    decide(r, Thresholds())
    note = jitter_note(r, Thresholds())
    assert r.status == "fail" and note and "agrees only 94.0%" in note and "below the 98% INT8 floor" in note
    assert jitter_note(r, Thresholds(int8_min_agreement=0.94)) is None  # the model holds this floor: no such excuse
    r.quantization["fp32_input_jitter"]["agreement"] = 0.99
    assert jitter_note(r, Thresholds()) is None  # robust model, INT8 still failed: the quantization is to blame
    # robust on the training images it learnt, not on the validation images the gate scores: that is named
    note = jitter_note(r, Thresholds(), {"agreement": 0.97, "images": 500})
    assert note and "agrees only 97.0%" in note and "500 validation images" in note
    assert jitter_note(r, Thresholds(), {"agreement": 0.985, "images": 500}) is None
    # where the misses are: split by whether FP32's own answer moved under the jitter
    from kimchi_edge.convert.gate import split_by_stability

    agree = np.ones(10, dtype=bool)
    agree[[1, 7, 8]] = False  # misses on two of the three images the jitter moved, one of the seven it did not
    split = split_by_stability({"flipped": [7, 8, 9], "draws": 2}, agree)
    assert split == {"stable_images": 7, "agreement_on_stable": pytest.approx(6 / 7), "flipped_images": 3,
                     "agreement_on_flipped": pytest.approx(1 / 3), "draws": 2}
    assert split_by_stability({"flipped": [], "draws": 2}, agree)["agreement_on_flipped"] is None
    r.quantization["valid_jitter"] = split
    note = jitter_note(r, Thresholds(), {"agreement": 0.97, "images": 500})
    assert "agrees on 85.7% of the 7 images whose FP32 answer no jitter draw moved and on 33.3% of the 3 it moved" in note
    note = jitter_note(r, Thresholds(), {"agreement": 0.985, "images": 500})  # FP32 holds the floor: INT8's own misses
    assert note and "holds the 98% INT8 floor" in note and "the quantization is what misses it" in note
    ok = _result("onnx-int8", "int8", 0.99, 0.0)
    ok.quantization = {"fp32_input_jitter": {"agreement": 0.9, "mean_abs_dprob": 0.02}}
    decide(ok, Thresholds())
    assert jitter_note(ok, Thresholds()) is None  # passed: nothing to explain


def _manifest(*names: str) -> BundleManifest:
    pre = Preprocessing(height=8, width=8, resize_height=8, resize_width=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    arts = tuple(Artifact(name=n, file=n, format="tensorrt" if n.startswith("trt") else "onnx",
                          precision=n.split("-")[-1], sha256="0", size_bytes=1) for n in names)
    return BundleManifest(model=ModelMeta(labels=LABELS, architecture="x", preprocessing=pre), artifacts=arts)


def test_int8_failure_falls_back_with_a_stated_reason():
    m = _manifest("onnx-fp32", "onnx-int8", "trt-fp16", "trt-int8")
    rec, notes = recommend(m, {"onnx-fp32": "pass", "onnx-int8": "fail", "trt-fp16": "pass", "trt-int8": "fail"})
    assert rec == {"onnxruntime": "onnx-fp32", "tensorrt": "trt-fp16"}
    assert "onnx-int8 failed the gate and is not recommended; onnxruntime uses onnx-fp32 instead" in notes
    assert "trt-int8 failed the gate and is not recommended; tensorrt uses trt-fp16 instead" in notes
    rec, _ = recommend(m, {"onnx-fp32": "pass", "onnx-int8": "pass"})
    assert rec["onnxruntime"] == "onnx-int8"


def test_embedded_preprocessing_mismatch_is_named():
    m = _manifest("onnx-fp32")
    import json

    good = {"kimchi_edge.labels": json.dumps(list(LABELS)), "kimchi_edge.preprocessing": json.dumps(to_dict(m.preprocessing))}
    assert embedded_mismatch(good, m) == ""
    bad_pre = dict(to_dict(m.preprocessing), mean=[0.485, 0.456, 0.406], resize_method="squish")
    bad = {"kimchi_edge.labels": json.dumps(["가", "다", "나"]), "kimchi_edge.preprocessing": json.dumps(bad_pre)}
    msg = embedded_mismatch(bad, m)
    assert "labels" in msg and "resize_method" in msg and "mean" in msg
