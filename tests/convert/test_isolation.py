"""The gate runs where only the runtime is installed: no torch, no fastai, no TensorRT.

``kimchi_edge.convert.gate``, ``kimchi_edge.convert.verify_cli``, ``kimchi_edge.convert.tensorrt`` (called by ``kimchi-edge build-engine``
on the target) and their imports load in a fresh interpreter where those packages cannot be
imported, and ``kimchi-edge verify`` scores the ONNX artifacts there, skipping TorchScript with the
reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

BLOCKED = ("torch", "torchvision", "fastai", "fastcore", "timm", "tensorrt", "onnxscript")
LIGHT_MODULES = ("kimchi_edge.convert", "kimchi_edge.convert.gate", "kimchi_edge.convert.verify_cli", "kimchi_edge.convert.cli", "kimchi_edge.convert.tensorrt", "kimchi_edge.convert.runfolder",
                 "kimchi_edge.convert.progress", "kimchi_edge.convert.errors", "kimchi_edge.convert.torchscript",
                 "kimchi_edge.convert.triton", "kimchi_edge.convert.triton_cli", "kimchi_edge.convert.gate_stats",
                 "kimchi_edge.convert.gate_policy", "kimchi_edge.convert.gate_report", "kimchi_edge.convert.build_engine_cli",
                 "kimchi_edge.convert.ort_format")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def run_blocked(body: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(body), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_light_convert_modules_import_without_torch_fastai_tensorrt():
    proc = run_blocked(
        """
        import importlib, json, sys
        for name in sys.argv[1:]:
            importlib.import_module(name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "fastai", "tensorrt", "onnx", "polygraphy"))
        print(json.dumps(heavy))
        """,
        *LIGHT_MODULES,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_tensorrt_module_says_why_in_one_line_without_tensorrt():
    proc = run_blocked(
        """
        from kimchi_edge.convert.tensorrt import TensorRTUnavailableError, engine_from_onnx, tensorrt_unavailable_reason
        from kimchi_edge.runtime.errors import KimchiEdgeError
        print(tensorrt_unavailable_reason())
        try:
            engine_from_onnx("model.onnx", "model.engine", fp16=True)
        except TensorRTUnavailableError as exc:
            assert isinstance(exc, KimchiEdgeError)
            print("ERR", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    reason, err = proc.stdout.strip().splitlines()
    assert "tensorrt is not installed" in reason
    assert err.startswith("ERR TensorRT engines cannot be built here: ") and "\n" not in err


@pytest.mark.slow
def test_verify_runs_on_a_runtime_only_install(bundle_copy):
    proc = run_blocked(
        """
        import sys
        from kimchi_edge.cli import main
        sys.exit(main(["verify", sys.argv[1], "--json"]))
        """,
        str(bundle_copy),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # --json: one object on stdout, nothing else there
    assert doc["gate"]["passed"] is True
    assert doc["gate"]["artifacts"]["torchscript"]["status"] == "skipped"
    assert "torch" in doc["gate"]["artifacts"]["torchscript"]["reason"]
    assert "torchscript not scored here: torch" in proc.stderr  # the table and notes go to stderr
    report = json.loads((bundle_copy / "gate.json").read_text(encoding="utf-8"))
    status = {a["name"]: a["status"] for a in report["artifacts"]}
    assert status["onnx-fp32"] == status["onnx-int8"] == "pass" and status["torchscript"] == "skipped"
    # the TorchScript verdict from convert is kept, not forgotten
    manifest = json.loads((bundle_copy / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["gate"]["artifacts"]["torchscript"]["status"] == "pass"
    assert manifest["recommended"]["torchscript"] == "torchscript"
