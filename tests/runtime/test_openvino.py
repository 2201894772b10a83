"""The OpenVINO backend: same numbers as ONNX Runtime on real files, and it runs only what the gate passed *on OpenVINO*.

The colour bundle is re-gated here with ``run_gate(..., openvino=True)`` so it gets its ``"onnx-fp32 @ openvino"`` row;
copies with edited verdicts (or a gate run where OpenVINO's logits are made wrong) check the refusals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from kimchi_edge.cli import main
from kimchi_edge.runtime import BundleError, Classifier, InvalidInputError, UsageError
from kimchi_edge.runtime.manifest import GATE_JSON, GATE_MD, GateVerdict, read_manifest, write_manifest
from tests.conftest import COLOR_LABELS, REPO

X86_64 = platform.machine().lower() in ("x86_64", "amd64")
CPU = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip("openvino", reason="needs OpenVINO (pip install 'kimchi-edge[openvino]')")


@pytest.fixture(scope="module")
def ov_bundle(openvino, color_bundle, tmp_path_factory):
    """A copy of the colour bundle gated on ONNX Runtime *and* OpenVINO (its own verification set)."""
    from kimchi_edge.convert.gate import run_gate

    dst = tmp_path_factory.mktemp("ov") / "bundle"
    shutil.copytree(color_bundle, dst)
    run_gate(dst, quiet=True, openvino=True)
    return dst


def with_providers(src, dst, providers: tuple[str, ...], fastest: str = ""):
    """A copy whose onnx-fp32 verdict passed on ``providers`` only (a manifest edit, as an older gate would leave it)."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    gate = dataclasses.replace(m.gate, artifacts={**m.gate.artifacts, "onnx-fp32": GateVerdict("pass", "", providers, fastest)})
    write_manifest(dst, m.replace(gate=gate))
    return dst


def real_images(bundle) -> list:
    """The bundle's verification files plus noisy photos of every dominant colour (not just solid squares)."""
    files = sorted((bundle / "verification").rglob("*.png"))
    rng = np.random.default_rng(3)
    photos = []
    for i in range(12):
        arr = rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3), dtype=np.uint8)
        arr[..., i % 3] = np.maximum(arr[..., i % 3], 120 + 10 * i)
        photos.append(Image.fromarray(arr, "RGB"))
    return files + photos


# --------------------------------------------------------------------------- the gate's OpenVINO row


def test_gate_scores_each_onnx_artifact_on_openvino(ov_bundle):
    doc = json.loads((ov_bundle / GATE_JSON).read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in doc["artifacts"]}
    row = rows["onnx-fp32 @ openvino"]
    assert row["status"] == "pass" and row["artifact"] == "onnx-fp32" and row["backend"] == "openvino"
    assert row["runtime"]["backend"] == "openvino" and row["runtime"]["openvino"]
    assert rows["onnx-fp32"]["status"] == "pass" and rows["onnx-fp32"]["backend"] == ""
    assert doc["environment"]["ran_on"]["onnx-fp32 @ openvino"] == ["openvino"]
    assert doc["environment"]["ran_on"]["onnx-fp32"] == [CPU]
    assert doc["environment"]["openvino"]
    assert "| onnx-fp32 @ openvino | fp32 |" in (ov_bundle / GATE_MD).read_text(encoding="utf-8")
    verdict = read_manifest(ov_bundle).gate.verdict("onnx-fp32")
    assert verdict.status == "pass" and verdict.providers == (CPU, "openvino")


def test_failed_openvino_row_removes_openvino_and_leaves_the_artifact_passed(ov_bundle, tmp_path, monkeypatch):
    """OpenVINO made to answer wrongly (its logits rolled by one class): the gate still passes, OpenVINO is refused."""
    from kimchi_edge.convert.gate import run_gate
    from kimchi_edge.runtime.backends import openvino_backend

    b = tmp_path / "b"
    shutil.copytree(ov_bundle, b)  # its verdict says CPU + openvino: the failed row must take openvino away
    real = openvino_backend.OpenVINOBackend.infer
    monkeypatch.setattr(openvino_backend.OpenVINOBackend, "infer", lambda self, batch: np.roll(real(self, batch), 1, axis=1))
    lines: list[str] = []
    report = run_gate(b, openvino=True, log=lines.append)
    monkeypatch.undo()

    assert report.passed is True  # an FP32 row on OpenVINO failing is not a gate failure
    assert report.result("onnx-fp32").status == "pass"
    row = report.result("onnx-fp32 @ openvino")
    assert row.status == "fail" and "agreement 0.00%" in row.reason
    assert "FAIL (not run on openvino)" in lines[0]
    assert any(n.startswith("onnx-fp32 failed on openvino") for n in report.notes)
    verdict = read_manifest(b).gate.verdict("onnx-fp32")
    assert verdict.status == "pass" and verdict.providers == (CPU,)

    with pytest.raises(BundleError, match=r"onnx-fp32 passed the gate on CPUExecutionProvider, not on openvino \(see .*gate\.md\)"):
        Classifier.from_bundle(b, backend="openvino")
    with Classifier.from_bundle(b) as clf:
        assert clf.info["backend"] == "onnxruntime" and clf.info["gated"] is True


def test_earlier_openvino_pass_is_kept_when_not_rescored(ov_bundle, tmp_path):
    """Another machine's (or an earlier run's) OpenVINO pass stays when this run does not score OpenVINO."""
    from kimchi_edge.convert.gate import run_gate

    b = tmp_path / "b"
    shutil.copytree(ov_bundle, b)
    report = run_gate(b, openvino=False, quiet=True)
    assert not any(r.backend for r in report.results)
    assert read_manifest(b).gate.verdict("onnx-fp32").providers == (CPU, "openvino")


def test_verdict_providers_follow_the_openvino_row():
    from kimchi_edge.convert.gate_policy import ArtifactResult
    from kimchi_edge.convert.gate_report import _verdict

    def row(status, backend=""):
        return ArtifactResult(name="onnx-int8" + (" @ openvino" if backend else ""), format="onnx", precision="int8",
                              status=status, runtime={"providers": [CPU]}, artifact="onnx-int8" if backend else "", backend=backend)

    class M:  # just what _verdict reads: the earlier verdict
        def __init__(self, providers):
            self.gate = type("G", (), {"verdict": staticmethod(lambda n: GateVerdict("pass", "", providers))})()

    fresh = M(())
    assert _verdict(fresh, "onnx-int8", "pass", row("pass"), [row("pass", "openvino")]).providers == (CPU, "openvino")
    assert _verdict(fresh, "onnx-int8", "pass", row("pass"), [row("fail", "openvino")]).providers == (CPU,)
    assert _verdict(fresh, "onnx-int8", "pass", row("pass"), []).providers == (CPU,)
    ov_before = M((CPU, "tensorrt", "openvino"))
    assert _verdict(ov_before, "onnx-int8", "pass", row("pass"), [row("fail", "openvino")]).providers == (CPU, "tensorrt")
    assert _verdict(ov_before, "onnx-int8", "pass", row("pass"), [row("skipped", "openvino")]).providers == (CPU, "tensorrt", "openvino")
    failed = _verdict(ov_before, "onnx-int8", "fail", row("fail"), [row("pass", "openvino")])
    assert failed.status == "fail" and failed.providers == ()  # the artifact's status stays ONNX Runtime's


# --------------------------------------------------------------------------- the backend


def test_openvino_logits_match_onnxruntime_on_real_images(ov_bundle):
    with Classifier.from_bundle(ov_bundle, backend="onnxruntime") as ort, Classifier.from_bundle(ov_bundle, backend="openvino") as ov:
        assert ov.info["backend"] == "openvino" and ov.info["artifact"] == "onnx-fp32" and ov.info["gated"] is True
        assert ov.info["providers"] == ["CPU"] and ov.notes == []
        images = real_images(ov_bundle)
        batch = np.stack([ort.prepare(im)[0] for im in images])
        a, b = ort.backend.infer(batch), ov.backend.infer(batch)
        assert b.dtype == np.float32 and b.shape == (len(images), len(COLOR_LABELS))
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
        first = ov.backend.infer(batch[:1])  # one at a time too, and an earlier result is not overwritten by the next
        ov.backend.infer(batch[1:2])
        np.testing.assert_allclose(first, a[:1], atol=1e-4, rtol=1e-4)
        labels = [p.label for p in ov.predict_batch(images, batch_size=5)]
        assert labels == [p.label for p in ort.predict_batch(images, batch_size=5)]
        assert set(labels) == set(COLOR_LABELS)  # the images really differ


def test_dtype_and_shape_errors_are_those_of_onnxruntime(ov_bundle):
    with Classifier.from_bundle(ov_bundle, backend="onnxruntime") as ort, Classifier.from_bundle(ov_bundle, backend="openvino") as ov:
        floats = np.zeros((1, 32, 32, 3), dtype=np.float32)
        messages = []
        for clf in (ort, ov):
            with pytest.raises(InvalidInputError) as exc:
                clf.backend.infer(floats)
            messages.append(str(exc.value))
        assert messages[0] == messages[1] == "got a batch of dtype float32; this model expects uint8"
        messages = []
        for clf in (ort, ov):
            with pytest.raises(InvalidInputError) as exc:
                clf.infer_array(np.zeros((2, 31, 32, 3), dtype=np.uint8))
            messages.append(str(exc.value))
        assert messages[0] == messages[1] == "got a batch of shape (2, 31, 32, 3); expected (N, 32, 32, 3)"
        with pytest.raises(InvalidInputError, match=r"^got a batch of shape \(2, 31, 32, 3\); expected \(N, 32, 32, 3\)$"):
            ov.backend.infer(np.zeros((2, 31, 32, 3), dtype=np.uint8))  # the backend itself checks too


def test_concurrent_predict_on_openvino_matches_sequential(ov_bundle):
    images = real_images(ov_bundle)
    with Classifier.from_bundle(ov_bundle, backend="openvino", threads=1) as clf:
        expected = [clf.predict(im).probabilities for im in images]
        barrier = threading.Barrier(4)

        def work(i):
            barrier.wait()
            return [clf.predict(im).probabilities for im in images[i::4]]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(work, range(4)))
    for i in range(4):
        np.testing.assert_allclose(np.array(got[i]), np.array(expected[i::4]), atol=1e-6)


# --------------------------------------------------------------------------- what runs is what passed, on OpenVINO


@pytest.mark.skipif(not X86_64, reason="auto considers OpenVINO on x86-64 only")
def test_auto_uses_openvino_where_it_passed_and_won(ov_bundle, tmp_path):
    won = with_providers(ov_bundle, tmp_path / "won", (CPU, "openvino"), fastest="openvino")
    with Classifier.from_bundle(won) as clf:
        assert clf.info["backend"] == ("openvino" if X86_64 else "onnxruntime") and clf.info["gated"] is True and clf.notes == []
    with Classifier.from_bundle(won, providers=[CPU]) as clf:  # ONNX Runtime providers asked for: ONNX Runtime
        assert clf.info["backend"] == "onnxruntime"
    lost = with_providers(ov_bundle, tmp_path / "lost", (CPU, "openvino"), fastest=CPU)  # passed, but slower here
    with Classifier.from_bundle(lost) as clf:
        assert clf.info["backend"] == "onnxruntime" and clf.notes == []
    with Classifier.from_bundle(lost, backend="openvino") as clf:  # asked for by name: it passed there, so it runs
        assert clf.info["backend"] == "openvino" and clf.info["gated"] is True


def test_the_gate_records_which_engine_was_faster(ov_bundle):
    v = read_manifest(ov_bundle).gate.verdict("onnx-fp32")
    assert set(v.providers) == {CPU, "openvino"} and v.fastest in (CPU, "openvino")


def test_verdict_without_openvino_does_not_run_there(ov_bundle, tmp_path):
    b = with_providers(ov_bundle, tmp_path / "b", (CPU,))
    with Classifier.from_bundle(b) as clf:
        assert clf.info["backend"] == "onnxruntime" and clf.info["gated"] is True
        if X86_64:
            assert len(clf.notes) == 1
            assert clf.notes[0].startswith("OpenVINO not used: onnx-fp32 passed the gate on CPUExecutionProvider, not on openvino")
            assert f"kimchi-edge verify {b}" in clf.notes[0]
    with pytest.raises(BundleError) as exc:
        Classifier.from_bundle(b, backend="openvino")
    msg = str(exc.value)
    assert "\n" not in msg and "not on openvino" in msg and "gate.md" in msg and "--allow-ungated" in msg
    with Classifier.from_bundle(b, backend="openvino", allow_ungated=True) as clf:
        assert clf.info["backend"] == "openvino" and clf.info["gated"] is False
        assert clf.notes[-1].startswith("UNGATED: onnx-fp32 passed the gate on CPUExecutionProvider, not on openvino")


def test_verdict_from_before_providers_were_recorded_is_not_openvino(ov_bundle, tmp_path):
    b = with_providers(ov_bundle, tmp_path / "b", ())
    with pytest.raises(BundleError, match="onnx-fp32 passed the gate on ONNX Runtime, not on openvino"):
        Classifier.from_bundle(b, backend="openvino")
    with Classifier.from_bundle(b) as clf:
        assert clf.info["backend"] == "onnxruntime" and clf.info["gated"] is True


def test_openvino_takes_no_onnxruntime_providers(ov_bundle):
    with pytest.raises(UsageError, match="ONNX Runtime execution providers; the openvino backend takes none"):
        Classifier.from_bundle(ov_bundle, backend="openvino", providers=[CPU])


def test_cli_predict_on_openvino(ov_bundle, tmp_path, capsys):
    Image.new("RGB", (64, 48), (240, 10, 10)).save(tmp_path / "red.png")
    assert main(["predict", str(ov_bundle), str(tmp_path / "red.png"), "--backend", "openvino", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "빨강 red" in out.splitlines()[1]
    assert "openvino (CPU), artifact onnx-fp32 (fp32): 1/1 images" in err


# --------------------------------------------------------------------------- the light install stays light


BLOCK_OPENVINO = textwrap.dedent(
    """
    import sys

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "openvino":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    if sys.argv[2] == "block":
        sys.meta_path.insert(0, _Blocker())
    """
)


def run_python(body: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_OPENVINO + textwrap.dedent(body), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD = """
    import json, sys
    import kimchi_edge.runtime.backends.openvino_backend  # the module itself imports no openvino
    from kimchi_edge.runtime import Classifier, KimchiEdgeError
    lazy = "openvino" not in sys.modules
    with Classifier.from_bundle(sys.argv[1], backend="onnxruntime") as clf:
        clf.predict(sys.argv[1] + "/verification/" + __import__("os").listdir(sys.argv[1] + "/verification")[0])
    lazy = lazy and "openvino" not in sys.modules
    with Classifier.from_bundle(sys.argv[1]) as clf:
        auto = clf.info["backend"]
    try:
        Classifier.from_bundle(sys.argv[1], backend="openvino")
        error = ""
    except KimchiEdgeError as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"lazy": lazy, "auto": auto, "error": error}))
"""


def test_openvino_is_imported_only_when_used(ov_bundle, tmp_path):
    won = with_providers(ov_bundle, tmp_path / "won", (CPU, "openvino"), fastest="openvino")
    result = run_python(LOAD, str(won), "no-block")
    assert result["lazy"] is True and result["error"] == ""
    assert result["auto"] == ("openvino" if X86_64 else "onnxruntime")


def test_without_openvino_auto_uses_onnxruntime_and_the_backend_names_the_fix(ov_bundle):
    result = run_python(LOAD, str(ov_bundle), "block")
    assert result["auto"] == "onnxruntime"
    assert result["error"].startswith("MissingDependencyError: the OpenVINO backend needs openvino")
    assert result["error"].endswith("install it with: pip install 'kimchi-edge[openvino]'")
