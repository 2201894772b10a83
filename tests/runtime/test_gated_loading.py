"""Only what the accuracy gate passed runs by default (the bundle's promise, enforced by every loader)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from kimchi_edge.cli import main
from kimchi_edge.runtime import BundleError, Classifier
from kimchi_edge.runtime.errors import UsageError
from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import GateVerdict, read_manifest, write_manifest


def with_verdicts(src, dst, verdicts: dict[str, GateVerdict], *, int8=True, recommended=None, fast_decode=False):
    """A copy of the gated colour bundle with an 'onnx-int8' artifact and the given verdicts."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    arts = m.artifacts
    if int8:
        shutil.copy(dst / "model.onnx", dst / "model.int8.onnx")
        fp32 = m.artifact("onnx-fp32")
        arts += (dataclasses.replace(fp32, name="onnx-int8", file="model.int8.onnx", precision="int8",
                                     sha256=sha256_file(dst / "model.int8.onnx")),)
    gate = dataclasses.replace(m.gate, artifacts={**m.gate.artifacts, **verdicts}, fast_decode=fast_decode)
    write_manifest(dst, m.replace(artifacts=arts, gate=gate, recommended=recommended or {"onnxruntime": "onnx-int8"}))
    return dst


PASS_CPU = GateVerdict("pass", "", ("CPUExecutionProvider",))


def test_recommended_artifact_that_failed_is_not_loaded(color_bundle, tmp_path):
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-int8": GateVerdict("fail", "loses 18.40 points > 1"), "onnx-fp32": PASS_CPU})
    with Classifier.from_bundle(b) as clf:
        assert clf.info["artifact"] == "onnx-fp32" and clf.info["gated"] is True
    with pytest.raises(BundleError, match=r"onnx-int8 failed: loses 18.40 points > 1 \(see .*gate.md\).*--allow-ungated"):
        Classifier.from_bundle(b, artifact="onnx-int8")
    with Classifier.from_bundle(b, artifact="onnx-int8", allow_ungated=True) as clf:
        assert clf.info["gated"] is False and clf.notes[-1].startswith("UNGATED: onnx-int8 failed")


def test_fp32_failed_refuses_the_bundle(color_bundle, tmp_path):
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-int8": PASS_CPU, "onnx-fp32": GateVerdict("fail", "agreement 90.00% < 99.5%")})
    with pytest.raises(BundleError) as exc:
        Classifier.from_bundle(b)
    msg = str(exc.value)
    assert "\n" not in msg and "onnx-fp32 failed: agreement 90.00%" in msg and "gate.md" in msg
    with Classifier.from_bundle(b, allow_ungated=True) as clf:  # the user said so: runs, and says it
        assert clf.info["gated"] is False


def test_never_gated_bundle_runs_only_when_allowed(ungated_color_bundle, capsys):
    with pytest.raises(BundleError, match="the accuracy gate has never run on this bundle"):
        Classifier.from_bundle(ungated_color_bundle)
    assert main(["predict", str(ungated_color_bundle), "nothing.jpg"]) == 1
    assert "--allow-ungated" in capsys.readouterr().err
    with Classifier.from_bundle(ungated_color_bundle, allow_ungated=True) as clf:
        assert clf.info["gated"] is False and "UNGATED" in clf.info["notes"][-1]


def test_int8_for_tensorrt_runs_on_onnx_runtime_only_when_named(color_bundle, tmp_path):
    """Two INT8 files, both passed: ONNX Runtime picks the one made for it, never TensorRT's, unless asked by name."""
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-fp32": PASS_CPU, "onnx-int8": PASS_CPU, "onnx-int8-qdq-s8": PASS_CPU},
                      recommended={})
    m = read_manifest(b)
    shutil.copy(b / "model.onnx", b / "model.int8-qdq-s8.onnx")
    cpu = dataclasses.replace(m.artifact("onnx-int8"), target="onnxruntime-cpu")
    trt = dataclasses.replace(cpu, name="onnx-int8-qdq-s8", file="model.int8-qdq-s8.onnx", target="tensorrt")
    write_manifest(b, m.replace(artifacts=tuple(a for a in m.artifacts if a.name != "onnx-int8") + (trt, cpu)))
    with Classifier.from_bundle(b, backend="onnxruntime", precision="int8") as clf:
        assert clf.info["artifact"] == "onnx-int8"
    with Classifier.from_bundle(b, backend="onnxruntime", artifact="onnx-int8-qdq-s8") as clf:
        assert clf.info["artifact"] == "onnx-int8-qdq-s8"
    only_trt = read_manifest(b)
    write_manifest(b, only_trt.replace(artifacts=tuple(a for a in only_trt.artifacts if a.name != "onnx-int8")))
    with Classifier.from_bundle(b, backend="onnxruntime") as clf:  # FP32, not the file made for TensorRT
        assert clf.info["artifact"] == "onnx-fp32"
    with pytest.raises(UsageError, match="no ONNX artifact in int8"):
        Classifier.from_bundle(b, backend="onnxruntime", precision="int8")


def test_skipped_is_not_passed(color_bundle, tmp_path):
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-int8": GateVerdict("skipped", "not scored"), "onnx-fp32": PASS_CPU})
    with Classifier.from_bundle(b) as clf:
        assert clf.info["artifact"] == "onnx-fp32"


def test_provider_the_gate_never_scored_is_not_used(color_bundle, tmp_path):
    """Passed on CUDA elsewhere; this machine has only the CPU provider: not run until verify scores it here."""
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-fp32": GateVerdict("pass", "", ("CUDAExecutionProvider",))},
                      int8=False, recommended={"onnxruntime": "onnx-fp32"})
    with pytest.raises(BundleError, match="passed the gate on CUDAExecutionProvider, which is not available here"):
        Classifier.from_bundle(b)
    with Classifier.from_bundle(b, allow_ungated=True) as clf:
        assert clf.info["providers"] == ["CPUExecutionProvider"]


def test_default_decode_is_the_one_the_gate_passed(color_bundle, tmp_path):
    with Classifier.from_bundle(color_bundle) as clf:  # PNG verification set: fast JPEG decoding never judged
        assert clf.info["fast_decode"] is False
    b = with_verdicts(color_bundle, tmp_path / "b", {}, int8=False, recommended={"onnxruntime": "onnx-fp32"}, fast_decode=True)
    with Classifier.from_bundle(b) as clf:
        assert clf.info["fast_decode"] is True
    with Classifier.from_bundle(b, fast_decode=False) as clf:
        assert clf.info["fast_decode"] is False


def test_health_says_ungated_in_words(ungated_color_bundle):
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    from fastapi.testclient import TestClient

    from kimchi_edge.runtime.server import create_app

    with Classifier.from_bundle(ungated_color_bundle, allow_ungated=True) as clf, TestClient(create_app(clf)) as client:
        health = client.get("/health").json()
        assert health["gated"] is False and health["warning"].startswith("UNGATED: the accuracy gate has never run")
        meta = client.get("/metadata").json()
        assert meta["gated"] is False and meta["gate_in_words"] == ["the accuracy gate has never run on this bundle"]


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_for_vnni_cpus_runs_only_on_one(color_bundle, tmp_path, monkeypatch, vnni):
    """The 8-bit-weight INT8 is recommended where it passed, but runs only on a CPU with VNNI; elsewhere the portable
    INT8 (same precision, not FP32) takes its place, and naming it is refused in one line that names the way out."""
    from kimchi_edge.runtime import sysinfo

    monkeypatch.setattr(sysinfo, "cpu_has_vnni", lambda flags=None: vnni)  # the CPU probe; the kernels' side: test_int8_kernels
    b = with_verdicts(color_bundle, tmp_path / "b", {"onnx-fp32": PASS_CPU, "onnx-int8": PASS_CPU, "onnx-int8-vnni": PASS_CPU},
                      recommended={"onnxruntime": "onnx-int8-vnni"})
    m = read_manifest(b)
    shutil.copy(b / "model.onnx", b / "model.int8-vnni.onnx")
    cpu = dataclasses.replace(m.artifact("onnx-int8"), target="onnxruntime-cpu")
    vnni_art = dataclasses.replace(cpu, name="onnx-int8-vnni", file="model.int8-vnni.onnx", target="onnxruntime-cpu-vnni")
    write_manifest(b, m.replace(artifacts=tuple(a for a in m.artifacts if a.name != "onnx-int8") + (cpu, vnni_art)))
    with Classifier.from_bundle(b, backend="onnxruntime") as clf:
        assert clf.info["artifact"] == ("onnx-int8-vnni" if vnni else "onnx-int8")
        said = [n for n in clf.notes if "not the recommended onnx-int8-vnni" in n]
        assert bool(said) != vnni  # where it is passed over, the user is told why
    if vnni:
        with Classifier.from_bundle(b, backend="onnxruntime", artifact="onnx-int8-vnni") as clf:
            assert clf.info["artifact"] == "onnx-int8-vnni"
    else:
        for allow in (False, True):  # not a gate question: allow_ungated does not make it compute the right numbers here
            with pytest.raises(UsageError, match=r"onnx-int8-vnni is the INT8 for x86-64 CPUs with VNNI .* this CPU has none.*; run onnx-int8 instead$"):
                Classifier.from_bundle(b, backend="onnxruntime", artifact="onnx-int8-vnni", allow_ungated=allow)
        portable = read_manifest(b)  # the portable INT8 failed: FP32 runs, never the VNNI file
        write_manifest(b, portable.replace(gate=dataclasses.replace(
            portable.gate, artifacts={**portable.gate.artifacts, "onnx-int8": GateVerdict("fail", "agreement 95.00% < 98%")})))
        with Classifier.from_bundle(b, backend="onnxruntime") as clf:
            assert clf.info["artifact"] == "onnx-fp32"
