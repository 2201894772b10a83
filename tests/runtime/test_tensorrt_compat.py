"""The TensorRT engine check runs before deserialising and is a pure function: tested here with dicts for the
installed facts, without TensorRT or a GPU.  Real engine execution is marked ``tensorrt``."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from kimchi_edge.runtime import Classifier
from kimchi_edge.runtime.backends.tensorrt_backend import (
    TensorRTUnavailable,
    choose_engine,
    engine_mismatches,
    explain_mismatch,
    installed_facts,
)
from kimchi_edge.runtime.fsutil import sha256_file
from kimchi_edge.runtime.manifest import Artifact, GateVerdict, read_manifest, write_manifest
from tests.conftest import COLOR_LABELS

ORIN = {"tensorrt": "10.3.0", "compute_capability": "8.7", "gpu": "Orin", "cuda_driver": "12.6"}


def engine_entry(source: Artifact, precision="fp16", installed=ORIN, file=None, sha256="0" * 64) -> Artifact:
    """An engine's manifest entry in the schema convert.tensorrt writes (see test_convert_writes_what_the_runtime_checks)."""
    return Artifact(
        name=f"trt-{precision}", file=file or f"model.{precision}.engine", format="tensorrt", precision=precision,
        sha256=sha256, size_bytes=10, input="uint8-nhwc", built_with={k: v for k, v in installed.items() if v},
        details={"precision": precision, "onnx_file": source.file, "onnx_sha256": source.sha256,
                 "profile": {"input": "image", "min": [1, 32, 32, 3], "opt": [1, 32, 32, 3], "max": [8, 32, 32, 3]}},
    )


def gated(manifest, *engines: Artifact):
    """The manifest as ``kimchi-edge verify`` leaves it after the engines passed the gate on TensorRT."""
    verdicts = {**manifest.gate.artifacts, **{e.name: GateVerdict("pass", "", ("tensorrt",)) for e in engines}}
    return manifest.replace(gate=dataclasses.replace(manifest.gate, artifacts=verdicts))


def with_engine(manifest, *, precision="fp16", installed=ORIN, source="onnx-fp32"):
    eng = engine_entry(manifest.artifact(source), precision, installed)
    return gated(manifest.replace(artifacts=manifest.artifacts + (eng,)), eng), eng


@pytest.fixture()
def manifest(color_bundle):
    return read_manifest(color_bundle)


def test_compatible_engine_has_no_mismatch(manifest):
    m, eng = with_engine(manifest)
    assert engine_mismatches(eng, m, ORIN) == []
    assert engine_mismatches(eng, m, {**ORIN, "tensorrt": "10.3.0.26"}) == []  # build number not recorded


def test_each_difference_is_named(manifest):
    m, eng = with_engine(manifest)
    assert engine_mismatches(eng, m, {**ORIN, "tensorrt": "10.7.0"}) == ["TensorRT: engine built with 10.3.0, installed 10.7.0"]
    assert engine_mismatches(eng, m, {**ORIN, "compute_capability": "8.9", "gpu": "NVIDIA L4"}) == [
        "GPU: engine built for compute capability 8.7 (Orin), this GPU has 8.9 (NVIDIA L4)"
    ]
    assert engine_mismatches(eng, m, ORIN, precision="int8") == ["precision: engine is fp16, int8 was asked for"]
    both = engine_mismatches(eng, m, {**ORIN, "tensorrt": "8.6.1", "compute_capability": "7.2"})
    assert [p.split(":")[0] for p in both] == ["TensorRT", "GPU"]


def test_patch_level_tensorrt_difference_is_a_mismatch(manifest):
    m, eng = with_engine(manifest, installed={**ORIN, "tensorrt": "8.5.2.2"})
    assert engine_mismatches(eng, m, {**ORIN, "tensorrt": "8.5.1.7"}) == ["TensorRT: engine built with 8.5.2.2, installed 8.5.1.7"]


def test_missing_tensorrt_or_gpu(manifest):
    m, eng = with_engine(manifest)
    problems = engine_mismatches(eng, m, {"tensorrt": None, "compute_capability": None, "gpu": None})
    assert problems[0].startswith("TensorRT: engine built with 10.3.0, not installed here (JetPack ships it")
    assert problems[1] == "GPU: engine built for compute capability 8.7, no CUDA GPU found here"


def test_source_onnx_changed_or_removed(manifest):
    m, eng = with_engine(manifest)
    changed = m.replace(artifacts=tuple(a if a.name != "onnx-fp32" else dataclasses.replace(a, sha256="f" * 64)
                                        for a in m.artifacts))
    (problem,) = engine_mismatches(eng, changed, ORIN)
    assert problem.startswith("source: model.onnx changed since the engine was built (SHA-256 ffffffffffff... now")
    gone = m.replace(artifacts=tuple(a for a in m.artifacts if a.name != "onnx-fp32"))
    assert engine_mismatches(eng, gone, ORIN) == ["source: engine was built from model.onnx, which is no longer in the bundle"]


def test_explanation_names_the_rebuild_command(manifest):
    m, eng = with_engine(manifest)
    msg = explain_mismatch(eng, engine_mismatches(eng, m, {**ORIN, "tensorrt": "10.7.0"}), "runs/x/bundle")
    assert msg == ("engine trt-fp16 (model.fp16.engine) cannot run here: TensorRT: engine built with 10.3.0, "
                   "installed 10.7.0; rebuild it here with: kimchi-edge build-engine runs/x/bundle --fp16")
    _, reasons = choose_engine(m, {"tensorrt": None, "compute_capability": None}, bundle="B")
    assert "rebuild" not in reasons[0]  # rebuilding on a machine without TensorRT cannot help


def test_choose_engine_prefers_recommended_then_precision(manifest):
    m, fp16 = with_engine(manifest, precision="fp16")
    m, fp32 = with_engine(m, precision="fp32")
    assert choose_engine(m, ORIN)[0].name == "trt-fp16"
    assert choose_engine(m.replace(recommended={**m.recommended, "tensorrt": "trt-fp32"}), ORIN)[0].name == "trt-fp32"
    assert choose_engine(m, ORIN, precision="fp32")[0].name == "trt-fp32"
    engine, reasons = choose_engine(m, {**ORIN, "compute_capability": "7.2"})
    assert engine is None and len(reasons) == 2
    engine, reasons = choose_engine(manifest, ORIN, bundle="B")
    assert engine is None and reasons == ["the bundle has no TensorRT engine (build one on the target: kimchi-edge build-engine B --fp16)"]


def bundle_with_engine(src, dst, installed=ORIN):
    shutil.copytree(src, dst)
    (dst / "model.fp16.engine").write_bytes(b"not really an engine")
    m = read_manifest(dst)
    eng = engine_entry(m.artifact("onnx-fp32"), "fp16", installed, sha256=sha256_file(dst / "model.fp16.engine"))
    write_manifest(dst, gated(m.replace(artifacts=m.artifacts + (eng,), recommended={**m.recommended, "tensorrt": "trt-fp16"}), eng))
    return dst


def test_convert_writes_what_the_runtime_checks(color_bundle, tmp_path):
    """Contract with convert.tensorrt: an entry it writes passes the check on the machine that built it."""
    ct = pytest.importorskip("kimchi_edge.convert.tensorrt", reason="needs convert/tensorrt.py")
    bundle = tmp_path / "b"
    shutil.copytree(color_bundle, bundle)
    src = read_manifest(bundle).artifact("onnx-fp32")
    (bundle / ct.engine_file("fp16")).write_bytes(b"engine bytes")
    facts = {**ORIN, "precision": "fp16", "onnx_file": src.file, "onnx_sha256": src.sha256, "polygraphy": "0.49"}
    written = ct.engine_artifact(bundle, "fp16", facts)
    m = read_manifest(bundle)
    m = m.replace(artifacts=m.artifacts + (written,))
    assert engine_mismatches(written, m, ORIN) == []
    assert [p.split(":")[0] for p in engine_mismatches(written, m, {**ORIN, "tensorrt": "10.7.0"})] == ["TensorRT"]
    engine, reasons = choose_engine(m, ORIN, bundle="B")  # built but never gated: auto does not run it
    assert engine is None and reasons == ["trt-fp16 has no accuracy-gate verdict (it was added after the gate ran); "
                                          "score it here: kimchi-edge verify B --artifact trt-fp16"]
    assert choose_engine(gated(m, written), ORIN)[0] == written
    assert choose_engine(m, ORIN, allow_ungated=True)[0] == written


def test_an_engine_that_failed_the_gate_is_not_chosen(manifest):
    m, eng = with_engine(manifest)
    failed = m.replace(gate=dataclasses.replace(m.gate, artifacts={**m.gate.artifacts, eng.name: GateVerdict("fail", "loses 3.00 points > 0.5")}))
    engine, reasons = choose_engine(failed, ORIN, bundle="B")
    assert engine is None and reasons[0].startswith("trt-fp16 failed: loses 3.00 points > 0.5")
    cpu_only = m.replace(gate=dataclasses.replace(m.gate, artifacts={**m.gate.artifacts, eng.name: GateVerdict("pass", "", ("CPUExecutionProvider",))}))
    assert choose_engine(cpu_only, ORIN)[0] is None  # passed, but not on TensorRT


def test_auto_falls_back_to_onnxruntime_and_says_why(color_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr("kimchi_edge.runtime.backends._openvino_applies", lambda: False)  # one note: TensorRT's
    bundle = bundle_with_engine(color_bundle, tmp_path / "b")
    with Classifier.from_bundle(bundle) as clf:  # this machine has neither TensorRT nor the Orin GPU
        assert clf.info["backend"] == "onnxruntime"
        (note,) = clf.notes
        assert note.startswith("TensorRT not used: engine trt-fp16 (model.fp16.engine) cannot run here: TensorRT: engine built with 10.3.0")
        assert note.endswith("using ONNX Runtime instead")
        assert clf.info["notes"] == [note]
        assert clf.predict(np.full((8, 8, 3), (250, 0, 0), np.uint8)).label == COLOR_LABELS[0]
    with Classifier.from_bundle(bundle, artifact="trt-fp16") as clf:  # the engine asked for is unusable: said, then ORT
        assert clf.info["artifact"] == "onnx-fp32" and "trt-fp16" in clf.notes[0]
    with Classifier.from_bundle(bundle, artifact="onnx-fp32") as clf:  # ONNX asked for: TensorRT not even considered
        assert clf.notes == []


def test_explicit_tensorrt_backend_raises_with_the_reason(color_bundle, tmp_path):
    bundle = bundle_with_engine(color_bundle, tmp_path / "b")
    with pytest.raises(TensorRTUnavailable, match="cannot run here: TensorRT: engine built with 10.3.0"):
        Classifier.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(TensorRTUnavailable, match="the bundle has no TensorRT engine"):
        Classifier.from_bundle(color_bundle, backend="tensorrt")


def test_incompatible_engine_is_never_read(color_bundle, tmp_path, monkeypatch):
    """Compatibility is decided from the manifest alone: the engine bytes are not even hashed."""
    import kimchi_edge.runtime.backends.tensorrt_backend as trt_backend

    bundle = bundle_with_engine(color_bundle, tmp_path / "b")
    (bundle / "model.fp16.engine").unlink()
    called = []
    monkeypatch.setattr(trt_backend, "verify_artifact", lambda *a: called.append(a))
    with pytest.raises(TensorRTUnavailable):
        trt_backend.create_tensorrt_backend(bundle, read_manifest(bundle), installed={**ORIN, "compute_capability": "8.9"})
    assert called == []


def test_installed_facts_here():
    facts = installed_facts()
    assert set(facts) >= {"tensorrt", "compute_capability", "gpu"}
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert facts["tensorrt"] is None


# --------------------------------------------------------------------------- build-engine without a GPU


def test_build_engine_without_tensorrt_is_one_clear_line(color_bundle, capsys):
    from kimchi_edge.cli import main

    if installed_facts()["tensorrt"]:
        pytest.skip("TensorRT is installed here")
    assert main(["build-engine", str(color_bundle), "--fp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("kimchi-edge build-engine: error: building an engine needs TensorRT and a CUDA GPU: ")
    assert "pip install" in err[0] or "GPU" in err[0]


def test_build_engine_builds_once_then_keeps_a_compatible_engine(color_bundle, tmp_path, monkeypatch, capsys):
    """build-engine's own logic, with convert.tensorrt's builder and the TensorRT backend replaced by stubs."""
    ct = pytest.importorskip("kimchi_edge.convert.tensorrt", reason="needs convert/tensorrt.py")
    import kimchi_edge.runtime.backends.tensorrt_backend as trt_backend
    from kimchi_edge.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(color_bundle, bundle)
    calls = []

    def add_engines(bundle_dir, precisions, *, batch, log):
        calls.append((precisions, batch))
        m = read_manifest(bundle_dir)
        (bundle_dir / "model.fp16.engine").write_bytes(b"engine")
        eng = engine_entry(m.artifact("onnx-fp32"), "fp16", ORIN, sha256=sha256_file(bundle_dir / "model.fp16.engine"))
        m = m.replace(artifacts=tuple(a for a in m.artifacts if a.name != eng.name) + (eng,))
        write_manifest(bundle_dir, m)
        return m

    class FakeBackend:
        """Stands in for TensorRTBackend: the same dtype/shape checks, and the engine computes what its ONNX computes
        (through ONNX Runtime), unless ``broken`` — an engine whose outputs are wrong, which the gate must catch."""

        broken = False
        name = "tensorrt"

        def __init__(self, bundle_dir, manifest, artifact, installed=None):
            import onnxruntime as ort

            self.artifact = artifact
            pre = manifest.preprocessing
            self.input_dtype = np.dtype(pre.dtype)  # an engine built from the bundle's ONNX takes its input dtype
            self.shape = pre.input_shape
            self.session = ort.InferenceSession(str(bundle_dir / artifact.details["onnx_file"]), providers=["CPUExecutionProvider"])

        def infer(self, batch):
            from kimchi_edge.runtime.errors import BackendError

            if batch.dtype != self.input_dtype:  # the real backend's message
                raise BackendError(f"got a batch of dtype {batch.dtype}; engine {self.artifact.file} expects {self.input_dtype}")
            if tuple(batch.shape[1:]) != self.shape:
                raise BackendError(f"got a batch of shape {batch.shape}; engine expects (N, {self.shape})")
            if self.broken:
                return np.zeros((len(batch), 3), np.float32)
            inp = self.session.get_inputs()[0]  # the test's colour ONNX takes uint8; a float32 bundle is simulated
            (out,) = self.session.run(None, {inp.name: batch.astype(np.uint8) if inp.type == "tensor(uint8)" else batch})
            return out

        def info(self):
            return {"backend": "tensorrt", "providers": ["TensorRT"], "artifact": self.artifact.name,
                    "precision": self.artifact.precision, "tensorrt": ORIN["tensorrt"]}

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(ct, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(ct, "add_engines", add_engines)
    monkeypatch.setattr(trt_backend, "installed_facts", lambda: dict(ORIN))
    monkeypatch.setattr(trt_backend, "TensorRTBackend", FakeBackend)
    assert main(["build-engine", str(bundle), "--fp16", "--max-batch", "4"]) == 0
    assert calls == [(("fp16",), (1, 1, 4))]
    out = capsys.readouterr().out
    assert "built trt-fp16: model.fp16.engine" in out
    # gated right away on the bundle's verification set, through the runtime: only then recommended and used
    assert "trt-fp16 passed the accuracy gate here and is recommended for tensorrt" in out
    m = read_manifest(bundle)
    assert m.gate.verdict("trt-fp16").providers == ("tensorrt",) and m.recommended["tensorrt"] == "trt-fp16"
    assert main(["build-engine", str(bundle)]) == 0  # compatible engine already there
    assert len(calls) == 1 and "already built for this machine" in capsys.readouterr().out
    assert main(["build-engine", str(bundle), "--force"]) == 0
    assert len(calls) == 2
    monkeypatch.setattr(trt_backend, "installed_facts", lambda: {**ORIN, "tensorrt": "10.7.0"})
    assert main(["build-engine", str(bundle)]) == 0  # after a TensorRT upgrade: rebuilt
    assert len(calls) == 3

    # What training writes by default: float32 input (fastai's batch resample makes fractional pixels).
    # The smoke test must feed the bundle's dtype (it fed uint8 zeros and exited 1 on every such bundle).
    import dataclasses

    m = read_manifest(bundle)
    write_manifest(bundle, m.replace(model=dataclasses.replace(
        m.model, preprocessing=dataclasses.replace(m.preprocessing, dtype="float32", batch_resize=True))))
    capsys.readouterr()
    assert main(["build-engine", str(bundle), "--force", "--json", "--no-gate"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["smoke_test"]["input"][1] == "float32" and doc["artifact"]["name"] == "trt-fp16"


def test_build_engine_does_not_recommend_an_engine_that_fails_its_gate(color_bundle, tmp_path, monkeypatch, capsys):
    """The same stand-in, now computing wrong outputs: the engine is recorded as failed and never chosen."""
    ct = pytest.importorskip("kimchi_edge.convert.tensorrt", reason="needs convert/tensorrt.py")
    import kimchi_edge.runtime.backends.tensorrt_backend as trt_backend
    from kimchi_edge.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(color_bundle, bundle)

    def build_engines(bundle_dir, manifest, precisions, *, timing_cache=None, batch=(1, 1, 8), log=print):
        (bundle_dir / "model.fp16.engine").write_bytes(b"engine")
        return [engine_entry(manifest.artifact("onnx-fp32"), "fp16", ORIN, sha256=sha256_file(bundle_dir / "model.fp16.engine"))]

    class WrongEngine:
        name = "tensorrt"

        def __init__(self, bundle_dir, manifest, artifact, installed=None):
            self.artifact, self.shape = artifact, manifest.preprocessing.input_shape

        def infer(self, batch):
            assert batch.dtype == np.uint8 and tuple(batch.shape[1:]) == self.shape
            return np.tile(np.array([[0.0, 0.0, 5.0]], np.float32), (len(batch), 1))  # always "blue"

        def info(self):
            return {"backend": "tensorrt", "providers": ["TensorRT"], "artifact": self.artifact.name, "precision": "fp16"}

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(ct, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(ct, "build_engines", build_engines)  # the real add_engines around a stubbed TensorRT build
    monkeypatch.setattr(trt_backend, "installed_facts", lambda: dict(ORIN))
    monkeypatch.setattr(trt_backend, "TensorRTBackend", WrongEngine)
    assert main(["build-engine", str(bundle), "--fp16"]) == 1
    assert "trt-fp16 FAILED the accuracy gate here" in capsys.readouterr().out
    m = read_manifest(bundle)
    assert m.gate.verdict("trt-fp16").status == "fail" and "tensorrt" not in m.recommended
    engine, reasons = choose_engine(m, ORIN, bundle=bundle)
    assert engine is None and "trt-fp16 failed" in reasons[0]


# --------------------------------------------------------------------------- real engines


@pytest.mark.tensorrt
def test_tensorrt_engine_agrees_with_onnxruntime(color_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="needs TensorRT (JetPack, or pip install 'kimchi-edge[tensorrt]') and a CUDA GPU")
    if not installed_facts()["compute_capability"]:
        pytest.skip("needs a CUDA GPU")
    from kimchi_edge.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(color_bundle, bundle)
    assert main(["build-engine", str(bundle), "--fp16", "--max-batch", "8"]) == 0
    images = [np.full((20, 30, 3), c, np.uint8) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))] * 5
    with Classifier.from_bundle(bundle, backend="tensorrt") as trt, Classifier.from_bundle(bundle, backend="onnxruntime") as ort:
        assert trt.info["backend"] == "tensorrt" and trt.notes == []
        assert [p.label for p in trt.predict_batch(images)] == [p.label for p in ort.predict_batch(images)]
