# Two commands for a fresh clone (needs Python >= 3.10 and make):
#   make quickstart   set up .venv, then train -> convert -> gate on the built-in sample
#   make test         set up .venv, then run the test suite
# More:
#   make test-py310   the runtime, server and demo tests under Python 3.10 (Jetson JetPack 6), in .venv310
#                     with the runtime-side extras only (no torch/fastai: tests that need them skip, saying so)
#   make resolve      check that every runtime-side install resolves for Jetson (Linux aarch64, Python 3.10)
#                     and Linux x86-64 (Python 3.10-3.13), and print the resolutions (uses uv, from the dev extra)
#   make demo         start the camera demo on the quickstart bundle
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= all
PYTEST_ARGS ?=

# Python 3.10: `python3.10` if it really runs (a pyenv shim may exist without the version selected), else pyenv's.
PYTHON310 ?= $(shell for p in python3.10 $$(pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10 /usr/bin/python3.10; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV310   ?= .venv310
PY310     := $(VENV310)/bin/python
EXTRAS310 ?= serve,demo,dev
PYTEST_ARGS310 ?= -m "not slow" tests/runtime tests/mobile_demo

# What `make resolve` checks: the runtime-side installs on each target (uv --python-platform / --python-version).
RESOLVE_INSTALLS ?= base onnxruntime serve demo
RESOLVE_TARGETS  ?= aarch64-manylinux_2_28/3.10 x86_64-manylinux_2_28/3.10 x86_64-manylinux_2_28/3.11 \
                    x86_64-manylinux_2_28/3.12 x86_64-manylinux_2_28/3.13

.PHONY: setup quickstart test demo clean setup-py310 test-py310 resolve

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "kimchi-edge needs Python >= 3.10, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@echo "installing kimchi-edge[$(EXTRAS)] into $(VENV) (first time: a few GB, a few minutes)"
	$(PIP) install --quiet --progress-bar off -e '.[$(EXTRAS)]'
	@touch $@

quickstart: setup
	$(VENV)/bin/kimchi-edge quickstart

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/kimchi-edge demo

setup-py310: $(VENV310)/.installed

$(VENV310)/.installed: pyproject.toml
	@test -n "$(PYTHON310)" || { echo "make: no Python 3.10 found (python3.10, pyenv's 3.10.x); set PYTHON310=/path/to/python3.10" >&2; exit 1; }
	@test -x $(PY310) || $(PYTHON310) -m venv $(VENV310)
	$(PY310) -m pip install --quiet --upgrade pip
	@echo "installing kimchi-edge[$(EXTRAS310)] into $(VENV310) with $$($(PY310) --version) (no torch, no fastai)"
	$(PY310) -m pip install --quiet --progress-bar off -e '.[$(EXTRAS310)]'
	@touch $@

test-py310: setup-py310
	@$(PY310) -c 'import sys, importlib.metadata as m; names = {d.metadata["Name"].lower() for d in m.distributions()}; \
	  shown = ("numpy", "onnxruntime", "onnxruntime-gpu", "streamlit", "streamlit-webrtc"); heavy = sorted(names & {"torch", "fastai"}); \
	  print("Python", sys.version.split()[0], *(n + "==" + m.version(n) for n in shown if n in names)); \
	  sys.exit("$(VENV310) must not have torch or fastai, found: " + ", ".join(heavy) if heavy else 0)'
	$(PY310) -m pytest $(PYTEST_ARGS310)

# Resolution only (nothing is installed): fails on the first install that has no solution for a target, or that
# would install both ONNX Runtime wheels (they provide the same `onnxruntime` module and overwrite each other).
resolve: setup
	@test -x $(VENV)/bin/uv || $(PIP) install --quiet --progress-bar off uv
	@set -e; for target in $(RESOLVE_TARGETS); do \
	  platform=$${target%/*}; version=$${target#*/}; \
	  for install in $(RESOLVE_INSTALLS); do \
	    extra=; [ "$$install" = base ] || extra="--extra $$install"; \
	    echo "== resolve kimchi-edge[$$install] for $$platform, Python $$version"; \
	    if ! out=$$($(VENV)/bin/uv pip compile pyproject.toml $$extra --python-platform $$platform --python-version $$version \
	                 --no-python-downloads --no-header --no-annotate --quiet 2>&1); then \
	      echo "$$out"; echo "make resolve: kimchi-edge[$$install] does not resolve for $$platform, Python $$version" >&2; exit 1; fi; \
	    echo "$$out" | grep -v '^ *#' | tr '\n' ' ' | fold -s -w 118 | sed 's/^/   /'; echo; \
	    if echo "$$out" | grep -q '^onnxruntime==' && echo "$$out" | grep -q '^onnxruntime-gpu=='; then \
	      echo "make resolve: kimchi-edge[$$install] on $$platform installs onnxruntime and onnxruntime-gpu (one module, two wheels)" >&2; exit 1; fi; \
	  done; \
	done; echo "make resolve: every install resolves on every target"

clean:
	rm -rf runs .kimchi-edge .pytest_cache test-artifacts
