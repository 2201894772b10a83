#!/usr/bin/env bash
# Make the virtual environment the real-Triton tests (tests/triton, marker `triton`) serve from.
#
#   bash tests/triton/setup_triton_venv.sh            # -> .venv-triton at the repository root
#   KIMCHI_EDGE_TRITON_VENV=/opt/kt bash tests/triton/setup_triton_venv.sh
#
# What it holds: nvidia-pytriton (its wheel ships a real `tritonserver` with the Python backend, which runs on a
# CPU-only machine), ONNX Runtime (the served classifier step runs the gated ONNX with it: the wheel has no
# onnxruntime backend), numpy, Pillow and kimchi-edge itself (editable, no extra dependencies), because the
# Python backend's preprocessing step imports kimchi_edge.runtime.preprocess.
#
# Why Debian's /usr/bin/python3.11: the Python backend stub embeds the libpython of the interpreter it runs for,
# and needs a shared libpython 3.11.  Debian's has one; a pyenv-built 3.11 without --enable-shared makes the stub
# fail at the first model load ("'_thread.RLock' object has no attribute '_recursion_count'").
# Idempotent: an existing, complete venv is left as it is (delete it to rebuild).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${KIMCHI_EDGE_TRITON_VENV:-$repo/.venv-triton}"
python="${KIMCHI_EDGE_TRITON_PYTHON:-/usr/bin/python3.11}"
pytriton="${KIMCHI_EDGE_PYTRITON:-nvidia-pytriton==0.7.0}"

# kimchi_edge in the venv must be this checkout (an editable install of another clone would serve other code)
imports_here() { "$venv/bin/python" -c 'import sys, kimchi_edge; sys.exit(0 if kimchi_edge.__file__.startswith(sys.argv[1]) else 1)' "$repo/" 2>/dev/null; }
if [ -f "$venv/.installed" ] && imports_here; then
  echo "triton venv: $venv is ready ($(cat "$venv/.installed"))"
  exit 0
fi
if [ -f "$venv/pyvenv.cfg" ]; then
  echo "triton venv: $venv is incomplete or installs another checkout; rebuilding it"
  rm -rf "$venv"
fi
if ! "$python" -c 'import sys, sysconfig; sys.exit(0 if sys.version_info[:2] == (3, 11) and sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)' 2>/dev/null; then
  echo "triton venv: $python is not a Python 3.11 with a shared libpython (Debian: apt-get install python3.11-venv);" \
       "set KIMCHI_EDGE_TRITON_PYTHON" >&2
  exit 1
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --progress-bar off "$pytriton" "onnxruntime>=1.17" "numpy>=1.23" "Pillow>=9.5"
"$venv/bin/python" -m pip install --quiet --progress-bar off --no-deps -e "$repo"
server="$("$venv/bin/python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver")')"
test -x "$server" || { echo "triton venv: nvidia-pytriton installed no tritonserver at $server" >&2; exit 1; }
"$venv/bin/python" -c 'import kimchi_edge.runtime.preprocess, onnxruntime, tritonclient.http' && imports_here \
  || { echo "triton venv: kimchi_edge (of $repo) / onnxruntime / tritonclient do not import in $venv" >&2; exit 1; }
"$venv/bin/python" -c 'import importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in ("nvidia-pytriton", "onnxruntime", "numpy", "Pillow")))' > "$venv/.installed"
echo "triton venv: ready at $venv ($(cat "$venv/.installed")); tritonserver: $server"
