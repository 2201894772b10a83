"""INT8 per target, calibration chosen on held-back training images, sensitive layers kept float, the agreement floor.

Small real models built here with ``onnx.helper`` (no torch, no training): a two-convolution network that classifies
16 px photos by their dominant colour.  ``outlier=`` puts one huge constant channel between the convolutions: with
per-tensor activation scales it wipes out the other channels when quantized, so INT8 agreement collapses until the
layers that read it stay in float — the case the fallback exists for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="building the test models needs onnx (pip install 'kimchi-edge[dev]')")

from kimchi_edge.convert.gate import Thresholds, run_gate  # noqa: E402
from kimchi_edge.convert.int8 import (  # noqa: E402
    CPU_TARGET,
    METHODS,
    RECIPES,
    TENSORRT_TARGET,
    VNNI_TARGET,
    _float_prefix_nodes,
    int8_artifacts_from_onnx,
    int8_from_onnx,
    split_holdout,
)
from kimchi_edge.runtime.fsutil import atomic_write_json, sha256_file  # noqa: E402
from kimchi_edge.runtime.manifest import (  # noqa: E402
    Artifact,
    BundleManifest,
    ModelMeta,
    Preprocessing,
    manifest_from_dict,
    read_manifest,
    to_dict,
    write_manifest,
)

LABELS = ("빨강 red", "초록 green", "파랑 blue")
SIZE = 16


def make_cnn(path: Path, *, outlier: float = 0.0) -> None:
    """uint8 NHWC -> /255 -> NCHW -> conv1 (1x1, 3->4) -> conv2 (1x1, 4->3) -> global average -> logits.

    logits = 10 * (mean RGB - 0.5); conv1's channel 0 is the constant ``outlier``, which conv2 ignores.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.zeros((4, 3, 1, 1), np.float32)
    w1[1:, :, 0, 0] = np.eye(3)
    b1 = np.array([outlier, -0.5, -0.5, -0.5], np.float32)
    w2 = np.zeros((3, 4, 1, 1), np.float32)
    w2[:, 1:, 0, 0] = 10 * np.eye(3)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["f", "scale"], ["x"], name="div"),
        helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2], name="layout"),
        helper.make_node("Conv", ["xc", "W1", "B1"], ["h"], name="conv1"),
        helper.make_node("Conv", ["h", "W2", "B2"], ["z"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["z"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "scale"), numpy_helper.from_array(w1, "W1"),
             numpy_helper.from_array(b1, "B1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.zeros(3, np.float32), "B2")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_photos(folder: Path, n: int, seed: int) -> list[Path]:
    """Noisy photos whose channel means are close (so a little quantization noise can flip some)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        base = 128 + rng.normal(0, 12, 3)
        img = np.clip(base + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(img).save(files[-1])
    return files


def meta() -> ModelMeta:
    pre = Preprocessing(height=SIZE, width=SIZE, resize_height=SIZE, resize_width=SIZE, batch_resize=False,
                        mean=(0.5,) * 3, std=(0.5,) * 3)
    return ModelMeta(labels=LABELS, architecture="tiny-cnn", preprocessing=pre)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("int8-photos")
    return {"train": write_photos(root / "train", 40, seed=1), "valid": write_photos(root / "valid", 60, seed=2)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8-models")
    make_cnn(root / "plain.onnx")
    make_cnn(root / "outlier.onnx", outlier=500.0)
    return {"plain": root / "plain.onnx", "outlier": root / "outlier.onnx"}


def _zero_points(path: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]


def test_one_recipe_per_target(models, photos, tmp_path):
    outs = {CPU_TARGET: tmp_path / "cpu.onnx", TENSORRT_TARGET: tmp_path / "trt.onnx"}
    d = int8_artifacts_from_onnx(models["plain"], outs, photos["train"], meta(), method="minmax", quiet=True, log=lambda m: None)
    cpu, trt = _zero_points(outs[CPU_TARGET]), _zero_points(outs[TENSORRT_TARGET])
    assert cpu and all(z.dtype == np.uint8 for z in cpu)  # what ONNX Runtime's x86 kernels run as integer convolutions
    assert trt and all(z.dtype == np.int8 and not z.any() for z in trt)  # TensorRT: symmetric, zero points 0
    assert d[CPU_TARGET]["target"] == CPU_TARGET and d[CPU_TARGET]["activations"] == "uint8 asymmetric"
    assert d[TENSORRT_TARGET]["target"] == TENSORRT_TARGET and d[TENSORRT_TARGET]["activations"] == "int8 symmetric"
    assert RECIPES[CPU_TARGET].artifact == "onnx-int8" and RECIPES[TENSORRT_TARGET].artifact == "onnx-int8-qdq-s8"
    # the cast / scale / layout in front of the first convolution stay float, in both
    assert d[CPU_TARGET]["float_prefix_nodes"] == ["cast", "div", "layout"]
    assert list(d[CPU_TARGET]["calibration_candidates"]) == ["minmax"]  # one method asked for: one calibrated
    assert d[CPU_TARGET]["prefix_channels_last_nodes"] == 0  # this prefix has nothing after its Transpose to move


def test_auto_calibration_is_chosen_on_held_back_training_images(models, photos, tmp_path):
    calib, held = split_holdout(photos["train"])
    assert (len(calib), len(held)) == (24, 16) and not set(calib) & set(held)
    d = int8_from_onnx(models["plain"], tmp_path / "cpu.onnx", photos["train"], meta(), method="auto", quiet=True, log=lambda m: None)
    cands = d["calibration_candidates"]
    assert list(cands) == list(METHODS) and all(c["images"] == 16 for c in cands.values())
    best = max(METHODS, key=lambda m: (cands[m]["agreement"], -cands[m]["mean_abs_dprob"]))
    assert d["calibration_method"] == best and d["calibration_images"] == 24 and d["holdout_images"] == 16
    assert set(d["calibration_seconds"]) == set(METHODS)


def test_sensitive_layers_stay_float_until_the_floor_is_reached(models, photos, tmp_path):
    quiet = {"method": "minmax", "quiet": True, "log": lambda m: None}
    none = int8_from_onnx(models["outlier"], tmp_path / "a.onnx", photos["train"], meta(), max_float_nodes=0, **quiet)
    assert none["calibration_candidates"]["minmax"]["agreement"] < 0.9 and none["float_nodes"] == []
    assert none["fallback"]["needed"] and not none["fallback"]["reached"]
    d = int8_from_onnx(models["outlier"], tmp_path / "b.onnx", photos["train"], meta(), min_agreement=0.98, **quiet)
    fb = d["fallback"]
    assert fb["needed"] and fb["reached"] and fb["agreement"] >= 0.98
    assert "conv2" in d["float_nodes"] and len(d["float_nodes"]) <= 2  # the fewest: conv2 reads the wiped-out tensor
    assert fb["sensitivity_db"][0]["nodes"] == ["conv2"]  # ranked first: the layer that loses the signal
    assert [t["float_nodes"] for t in fb["tries"]] == [1, 2]  # one was not enough; the fewest that reach the floor: two
    assert set(fb["holdout_ms_per_image"]) == {"without", "with"}
    # a floor nothing can reach (here: above 100 %) is reported as missed, never as reached
    high = int8_from_onnx(models["outlier"], tmp_path / "c.onnx", photos["train"], meta(), min_agreement=1.01, max_float_nodes=2, **quiet)
    assert high["fallback"]["needed"] and not high["fallback"]["reached"]


def test_fp32_sensitivity_to_one_grey_level_is_measured_on_the_held_back_images(models, photos, tmp_path):
    d = int8_from_onnx(models["plain"], tmp_path / "cpu.onnx", photos["train"], meta(), method="minmax", quiet=True, log=lambda m: None)
    j = d["fp32_input_jitter"]
    assert j["images"] == 40 and j["draws"] == 3 and len(j["agreement_per_draw"]) == 3 and "grey level" in j["perturbation"]
    assert j["split"].startswith("train")  # calibration + held-back training images, never the validation split
    # the photos' channel means are close (see write_photos): one grey level flips some of them, but not most
    assert 0.5 < j["agreement"] <= 1.0 and j["mean_abs_dprob"] > 0
    again = int8_from_onnx(models["plain"], tmp_path / "cpu2.onnx", photos["train"], meta(), method="minmax", quiet=True, log=lambda m: None)
    assert again["fp32_input_jitter"] == j  # seeded: a figure, not a dice roll


def test_front_nodes_before_the_first_conv_stay_float_even_when_they_are_matmuls():
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Cast", ["image"], ["f"], to=1, name="cast"),
             helper.make_node("MatMul", ["f", "R"], ["r"], name="preprocess/resample_w"),
             helper.make_node("Conv", ["r", "W"], ["c"], name="stem"),
             helper.make_node("Gemm", ["c", "F"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "g", [], [])
    assert _float_prefix_nodes(helper.make_model(g)) == ["cast", "preprocess/resample_w"]
    no_conv = helper.make_graph([nodes[0], nodes[3]], "g", [], [])
    assert _float_prefix_nodes(helper.make_model(no_conv)) == ["cast"]
    assert onnx  # imported for helper


def test_normalisation_moves_in_front_of_the_layout_transpose_with_the_same_answers(tmp_path):
    """The exported prefix (NHWC -> Transpose -> /255 -> -mean -> /std) runs on NHWC data with (1, 1, W, C) constants."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kimchi_edge.convert.int8 import prefix_channels_last

    consts = {"s": np.array(255.0, np.float32), "mean": np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1),
              "std": np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1),
              "W": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2], name="layout"),
             helper.make_node("Div", ["t", "s"], ["a"], name="div"), helper.make_node("Sub", ["a", "mean"], ["b"], name="sub"),
             helper.make_node("Div", ["b", "std"], ["x"], name="div_std"),
             helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="stem")]
    graph = helper.make_graph(nodes, "prefix", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, SIZE, SIZE])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    before = model.SerializeToString()
    assert prefix_channels_last(model, _float_prefix_nodes(model)) == 3
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Cast", "Div", "Sub", "Div", "Transpose", "Conv"]
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert sorted(s for s in shapes.values() if len(s) == 4 and s[1] == 1) == [(1, 1, SIZE, 3)] * 2
    x = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    run = lambda m: ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(before), run(model.SerializeToString()))


# --------------------------------------------------------------------------- the gate's INT8 floor, on a real bundle


def make_int8_bundle(folder: Path, model: Path, photos: dict[str, list[Path]], *, vnni: bool = False) -> Path:
    """FP32 + INT8 artifacts (the portable CPU and TensorRT ones; ``vnni`` adds the VNNI one), reference = the FP32
    model's own answers on the validation photos (the 'learner')."""
    import onnxruntime as ort

    from kimchi_edge.runtime.preprocess import Preprocessor

    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.read_bytes())
    recipes = {t: r for t, r in RECIPES.items() if vnni or t != VNNI_TARGET}
    outs = {t: folder / r.file for t, r in recipes.items()}
    details = int8_artifacts_from_onnx(folder / "model.onnx", outs, photos["train"], meta(), method="minmax", quiet=True,
                                       log=lambda m: None)

    def art(name: str, file: str, precision: str, target: str = "", d: dict | None = None) -> Artifact:
        return Artifact(name=name, file=file, format="onnx", precision=precision, sha256=sha256_file(folder / file),
                        size_bytes=(folder / file).stat().st_size, details=d or {}, target=target)

    arts = (art("onnx-fp32", "model.onnx", "fp32"),) + tuple(
        art(r.artifact, r.file, "int8", t, details[t]) for t, r in recipes.items())
    write_manifest(folder, BundleManifest(model=meta(), artifacts=arts, recommended={"onnxruntime": "onnx-fp32"}))
    root = photos["valid"][0].parent
    x = Preprocessor(meta().preprocessing).batch(photos["valid"])
    logits = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    items = [{"file": f.name, "label": LABELS[int(q.argmax())], "prediction": LABELS[int(q.argmax())], "probabilities": q.tolist()}
             for f, q in zip(photos["valid"], p)]
    atomic_write_json(folder / "reference.json", {"data_root": str(root), "labels": list(LABELS), "items": items,
                                                  "source": {"what": "the FP32 model itself"}})
    return folder


@pytest.fixture(scope="module")
def int8_bundle(models, photos, tmp_path_factory) -> Path:
    return make_int8_bundle(tmp_path_factory.mktemp("int8-bundle") / "bundle", models["plain"], photos)


def _gate(bundle: Path, floor: float):
    return run_gate(bundle, thresholds=Thresholds(int8_min_agreement=floor), quiet=True, openvino=False, check_fast_decode=False,
                    log=lambda m: None)


def test_int8_gate_passes_at_its_agreement_and_fails_just_above(int8_bundle):
    report = _gate(int8_bundle, 0.5)
    reached = report.result("onnx-int8").metrics["agreement"]
    assert reached >= 0.9  # a real INT8 model of a real network, not a broken one
    report = _gate(int8_bundle, reached)
    assert report.result("onnx-int8").status == "pass" and report.recommended["onnxruntime"] == "onnx-int8"
    assert report.result("onnx-int8-qdq-s8").status in ("pass", "fail")  # gated on ONNX Runtime like any artifact
    report = _gate(int8_bundle, reached + 0.001)  # the floor raised past what the artifact reaches
    assert report.result("onnx-int8").status == "fail" and report.recommended["onnxruntime"] == "onnx-fp32"
    assert "agreement" in report.result("onnx-int8").reason
    md = (int8_bundle / "gate.md").read_text(encoding="utf-8")
    assert f"INT8 agrees ≥ {(reached + 0.001) * 100:g}% and loses ≤ 1 points" in md
    assert "## INT8: target, calibration, layers kept in float" in md and "| onnx-int8 | onnxruntime-cpu |" in md
    assert "The FP32 model against its own answers with each input pixel moved by one grey level" in md
    gate_json = json.loads((int8_bundle / "gate.json").read_text(encoding="utf-8"))
    assert gate_json["thresholds"]["int8_min_agreement"] == pytest.approx(reached + 0.001)
    assert gate_json["thresholds"]["int8_max_loss_points"] == 1.0


def test_a_failed_int8_says_how_far_fp32_itself_holds_on_the_gate_images(int8_bundle, photos):
    """The validation-image jitter of FP32: measured on the gate's own images, named in a note only when it is the reason."""
    from kimchi_edge.convert.gate import fp32_jitter

    j = fp32_jitter(int8_bundle, photos["valid"], batch_size=16)
    assert j["images"] == len(photos["valid"]) and len(j["agreement_per_draw"]) == 2 and 0.5 < j["agreement"] <= 1.0
    assert fp32_jitter(int8_bundle, photos["valid"], batch_size=7) == j  # seeded, and the batch size changes nothing
    reached = _gate(int8_bundle, 0.5).result("onnx-int8").metrics["agreement"]
    report = _gate(int8_bundle, reached + 0.001)
    noted = [n for n in report.notes if "validation images, the gate's own" in n]
    if j["agreement"] < reached + 0.001:  # FP32 itself does not hold that floor here: it is named as the reason
        assert noted and f"agrees only {j['agreement'] * 100:.1f}%" in noted[0]
    else:
        assert not noted
    assert not [n for n in _gate(int8_bundle, 0.5).notes if "one grey level" in n]  # INT8 passed: nothing to explain


def test_runtime_runs_the_cpu_int8_and_the_tensorrt_one_only_by_name(int8_bundle, tmp_path):
    import shutil

    from kimchi_edge.runtime import Classifier

    b = tmp_path / "b"
    shutil.copytree(int8_bundle, b)
    report = _gate(b, 0.5)
    assert {r.name: r.status for r in report.results}["onnx-int8"] == "pass"
    m = read_manifest(b)
    write_manifest(b, m.replace(recommended={}))  # no recommendation: the choice itself must skip the TensorRT file
    with Classifier.from_bundle(b, backend="onnxruntime", precision="int8") as clf:
        assert clf.info["artifact"] == "onnx-int8"
    if report.result("onnx-int8-qdq-s8").status == "pass":
        with Classifier.from_bundle(b, backend="onnxruntime", artifact="onnx-int8-qdq-s8") as clf:
            assert clf.info["artifact"] == "onnx-int8-qdq-s8"


def test_manifest_records_the_target_and_old_bundles_still_load(int8_bundle):
    from kimchi_edge.convert.tensorrt import source_onnx
    from kimchi_edge.runtime.errors import BundleError

    m = read_manifest(int8_bundle)
    assert {a.name: a.target for a in m.artifacts} == {"onnx-fp32": "", "onnx-int8": CPU_TARGET, "onnx-int8-qdq-s8": TENSORRT_TARGET}
    assert source_onnx(m, "int8").name == "onnx-int8-qdq-s8"  # TensorRT INT8 engines: never the uint8 CPU file
    old = to_dict(m)
    old["artifacts"] = [{k: v for k, v in a.items() if k != "target"} for a in old["artifacts"] if a["name"] != "onnx-int8-qdq-s8"]
    legacy = manifest_from_dict(old)
    assert legacy.artifact("onnx-int8").target == ""
    assert source_onnx(legacy, "int8").name == "onnx-int8"  # before targets, the one INT8 file was the symmetric one
    cpu_only = m.replace(artifacts=tuple(a for a in m.artifacts if a.target != TENSORRT_TARGET))
    with pytest.raises(BundleError, match="no INT8 ONNX model quantized for TensorRT"):
        source_onnx(cpu_only, "int8")
    bad = to_dict(m)
    bad["artifacts"][1]["target"] = 7
    with pytest.raises(BundleError, match="target"):
        manifest_from_dict(bad)


def _weights(path: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
            and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]


def test_the_vnni_recipe_is_the_cpu_one_with_full_8bit_weights(models, photos, tmp_path):
    outs = {CPU_TARGET: tmp_path / "cpu.onnx", VNNI_TARGET: tmp_path / "vnni.onnx"}
    d = int8_artifacts_from_onnx(models["plain"], outs, photos["train"], meta(), method="minmax", quiet=True, log=lambda m: None)
    cpu, vnni = _weights(outs[CPU_TARGET]), _weights(outs[VNNI_TARGET])
    assert cpu and len(cpu) == len(vnni)
    assert max(int(np.abs(w.astype(int)).max()) for w in cpu) <= 64  # reduce_range: 7 bits, safe for vpmaddubsw
    assert all(int(np.abs(w.astype(int)).max()) == 127 for w in vnni)  # per channel symmetric: each layer's peak at 127
    assert all(z.dtype == np.uint8 for z in _zero_points(outs[VNNI_TARGET]))  # the same u8 activations as onnx-int8
    assert d[VNNI_TARGET]["target"] == VNNI_TARGET and "7-bit" not in d[VNNI_TARGET]["weights"] and "7-bit" in d[CPU_TARGET]["weights"]
    r = RECIPES[VNNI_TARGET]
    assert r.artifact == "onnx-int8-vnni" and not r.unbuildable_reason(vnni=True)
    assert "not built: this CPU has no avx512_vnni/avx_vnni/amx_int8" in r.unbuildable_reason(vnni=False)
    assert not RECIPES[CPU_TARGET].unbuildable_reason(vnni=False)


@pytest.mark.parametrize("vnni", [True, False])
def test_the_vnni_int8_is_gated_only_on_a_cpu_it_is_for(models, photos, tmp_path, monkeypatch, vnni):
    """Scored on a CPU without VNNI it would measure saturated kernels: skipped there, saying why; where VNNI is, it is
    gated like the others and recommended over the portable INT8 when it passes."""
    from kimchi_edge.runtime import sysinfo

    b = make_int8_bundle(tmp_path / "b", models["plain"], photos, vnni=True)
    real = sysinfo.cpu_has_vnni()
    monkeypatch.setattr(sysinfo, "cpu_has_vnni", lambda flags=None: vnni)
    report = _gate(b, 0.5)
    r = report.result("onnx-int8-vnni")
    if vnni:
        assert r.status in ("pass", "fail") and r.metrics
        if real:  # its numbers mean something only where the CPU really has VNNI (elsewhere the kernels may saturate)
            assert r.metrics["agreement"] >= 0.9 and r.status == "pass"
            assert report.recommended["onnxruntime"] == "onnx-int8-vnni"
    else:
        assert r.status == "skipped" and "this CPU has none" in r.reason
        assert report.recommended["onnxruntime"] in ("onnx-int8", "onnx-fp32")
        assert any(n.startswith("onnx-int8-vnni not scored here: ") for n in report.notes)
