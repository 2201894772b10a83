"""The runtime needs only numpy, Pillow and ONNX Runtime: every runtime module imports (and the CLI starts)
in a fresh interpreter where torch, fastai and tensorrt cannot be imported at all.

(Polygraphy's ``tests/mod/test_dependencies.py`` does the same for its own optional dependencies.)
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import kimchi_edge.runtime as runtime
from tests.conftest import REPO

#: Never importable in these subprocesses.
BLOCKED = ("torch", "torchvision", "fastai", "fastcore", "timm", "tensorrt", "tensorrt_libs", "pycuda")
#: Must not be imported by merely importing runtime modules (optional extras are imported at the point of use).
HEAVY = BLOCKED + ("polygraphy", "onnx", "fastapi", "uvicorn", "starlette", "streamlit", "matplotlib", "pandas",
                   "sklearn", "scipy", "cuda")

BLOCKER = textwrap.dedent(
    f"""
    import sys

    class _Blocker:
        BLOCKED = {BLOCKED!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the import-isolation test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def runtime_modules() -> list[str]:
    """Every module of the runtime package (walked from the source tree, not hard-coded)."""
    mods = ["kimchi_edge.runtime"]
    for info in pkgutil.walk_packages(runtime.__path__, prefix="kimchi_edge.runtime."):
        mods.append(info.name)
    return sorted(mods)


def run_blocked(body: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_runtime_module_list_is_complete():
    mods = runtime_modules()
    for expected in ("kimchi_edge.runtime.classifier", "kimchi_edge.runtime.backends.tensorrt_backend", "kimchi_edge.runtime.server", "kimchi_edge.runtime.predict_cli",
                     "kimchi_edge.runtime.bench_cli", "kimchi_edge.runtime.serve_cli"):
        assert expected in mods


def test_every_runtime_module_imports_without_torch_fastai_tensorrt():
    proc = run_blocked(
        """
        import importlib, json, sys
        for heavy in ("torch", "fastai", "tensorrt"):
            try:
                importlib.import_module(heavy)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"blocker failed: {heavy} imported")
        failed = {}
        for name in sys.argv[1:]:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"failed": failed, "modules": sorted(sys.modules)}))
        """,
        *runtime_modules(),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    loaded_heavy = sorted({m for m in result["modules"] if m.split(".")[0] in HEAVY})
    assert loaded_heavy == [], f"importing the runtime pulled in {loaded_heavy}"


def test_classify_and_cli_help_work_without_heavy_packages(color_bundle):
    proc = run_blocked(
        """
        import io, json, sys
        from PIL import Image
        from kimchi_edge.runtime import Classifier
        from kimchi_edge.cli import main

        clf = Classifier.from_bundle(sys.argv[1])
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 10, 250)).save(buf, "PNG")
        label = clf.predict(buf.getvalue()).label
        buf = io.StringIO()
        sys.stdout, real = buf, sys.stdout
        try:
            code = main(["--help"])
        except SystemExit as exc:
            code = exc.code
        sys.stdout = real
        heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
        print(json.dumps({"label": label, "help_exit": code, "heavy": heavy, "help": buf.getvalue()}, ensure_ascii=False))
        """,
        str(color_bundle), ",".join(HEAVY),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["label"] == "파랑 blue"
    assert result["help_exit"] == 0
    assert result["heavy"] == []
    for cmd in ("predict", "bench", "serve", "build-engine"):
        assert re.search(rf"^\s+{cmd}\s", result["help"], re.M), result["help"]


def test_runtime_source_never_unpickles_or_imports_torch():
    offenders = []
    pattern = re.compile(r"^\s*(import|from)\s+(torch|fastai|pickle|joblib|dill)\b|\b(pickle|torch)\.load\(|load_learner", re.M)
    for path in sorted(Path(runtime.__file__).parent.rglob("*.py")):
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.name}: {m.group(0).strip()}")
    assert offenders == []
