"""The built wheel: one top-level import name (``kimchi_edge``), every stage's modules inside it, one version.

The wheel is built once per session from a copy of the source (nothing is written into the repository), then
installed without dependencies into a new virtual environment: ``import kimchi_edge`` must work there with no
third-party module at all, and the generic names the folders have in the repository (``runtime``, ``train`` ...)
must not exist.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment: ~20-40 s on a 2-core machine

#: Repository folder -> where pyproject.toml's package-dir puts it.
STAGES = {"runtime": "kimchi_edge/runtime", "train": "kimchi_edge/train", "convert": "kimchi_edge/convert",
          "mobile_demo": "kimchi_edge/mobile_demo", "bench": "kimchi_edge/bench", "kimchi_edge": "kimchi_edge"}


def source_files() -> list[str]:
    """The files a checkout of this tree holds: tracked plus untracked-but-not-ignored (what a commit would add)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git to list the source files (a git checkout of the repository)")
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def version_in_source() -> str:
    tree = ast.parse((REPO / "kimchi_edge" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("kimchi_edge/__init__.py does not assign __version__")


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) >= (77, 0)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel_src") / "kimchi-edge"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel_out")
    # Offline when this environment already has the build requirement (setuptools>=77); else pip fetches it.
    isolation = ["--no-build-isolation"] if _setuptools_is_recent() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation, "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("kimchi_edge-*.whl")
    return whl


def wheel_names(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def dist_info_file(whl: Path, name: str) -> str | None:
    with zipfile.ZipFile(whl) as z:
        hits = [n for n in z.namelist() if re.fullmatch(r"kimchi_edge-[^/]+\.dist-info/" + re.escape(name), n)]
        return z.read(hits[0]).decode("utf-8") if hits else None


def test_only_top_level_name_is_kimchi_edge(wheel):
    names = wheel_names(wheel)
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"kimchi_edge"}, f"top-level entries in {wheel.name}: {sorted(top)}"
    record = dist_info_file(wheel, "RECORD")
    assert record, "the wheel has no RECORD"
    record_top = {line.split(",", 1)[0].split("/", 1)[0] for line in record.splitlines() if line}
    assert {t for t in record_top if not t.endswith(".dist-info")} == {"kimchi_edge"}
    top_level = dist_info_file(wheel, "top_level.txt")
    if top_level is not None:  # setuptools writes it; other backends may not
        assert top_level.split() == ["kimchi_edge"]
    for generic in ("runtime", "train", "convert", "mobile_demo", "bench"):
        assert not any(n == generic or n.startswith(generic + "/") for n in names), f"{generic}/ is top-level"


def test_every_stage_module_is_inside_the_package(wheel):
    """Each repository folder's Python files (and the demo's app.py, the docs) land under kimchi_edge/, subpackages too."""
    names = set(wheel_names(wheel))
    missing = []
    for rel in source_files():
        folder = rel.split("/", 1)[0]
        if folder in STAGES and rel.endswith((".py", ".md")) and "/" in rel:
            inside = STAGES[folder] + "/" + rel.split("/", 1)[1] if folder != "kimchi_edge" else rel
            if inside not in names:
                missing.append(f"{rel} -> {inside}")
    assert not missing, "not in the wheel: " + ", ".join(missing)
    for pkg in ("runtime", "runtime/backends", "train", "convert", "mobile_demo", "bench"):
        assert f"kimchi_edge/{pkg}/__init__.py" in names
    assert "kimchi_edge/mobile_demo/app.py" in names  # streamlit runs it by file path


def test_version_is_written_once(wheel):
    version = version_in_source()
    assert wheel.name.startswith(f"kimchi_edge-{version}-")
    assert re.search(rf"^Version: {re.escape(version)}$", dist_info_file(wheel, "METADATA"), re.M)
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        project = tomllib.loads(text)["project"]
        assert "version" not in project and "version" in project["dynamic"]
    assert not re.search(r"^version\s*=\s*\"", text, re.M), "pyproject.toml writes a version of its own"
    assert not (REPO / "setup.py").exists() and not (REPO / "setup.cfg").exists()
    assigned = [rel for rel in source_files() if rel.endswith(".py")
                and re.search(r"^__version__\s*=", (REPO / rel).read_text(encoding="utf-8", errors="replace"), re.M)]
    assert assigned == ["kimchi_edge/__init__.py"], f"__version__ assigned in {assigned}"


def test_installs_alone_and_imports_with_no_third_party_module(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        before = set(sys.modules)  # the interpreter's own start-up (site, .pth hooks)
        import kimchi_edge
        loaded = {m.split(".")[0] for m in set(sys.modules) - before}
        third_party = sorted(loaded - set(sys.stdlib_module_names) - {"kimchi_edge"})
        generic = [n for n in ("runtime", "train", "convert", "mobile_demo", "bench") if importlib.util.find_spec(n)]
        print(json.dumps({"version": kimchi_edge.__version__, "file": kimchi_edge.__file__,
                          "runtime": importlib.util.find_spec("kimchi_edge.runtime").origin,
                          "third_party": third_party, "generic": generic}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    site = Path(out["file"]).resolve()
    assert out["version"] == version_in_source()
    assert venv.resolve() in site.parents, f"imported from {site}, not from the venv"
    assert Path(out["runtime"]).resolve() == site.parent / "runtime" / "__init__.py"
    assert out["third_party"] == [], f"import kimchi_edge loaded {out['third_party']}"
    assert out["generic"] == [], f"top-level modules installed: {out['generic']}"
    assert (venv / ("Scripts" if os.name == "nt" else "bin") / "kimchi-edge").exists() or os.name == "nt"
