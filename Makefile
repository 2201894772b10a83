# Two commands for a fresh clone (needs Python >= 3.10 and make):
#   make quickstart   set up .venv, then train -> convert -> gate on the built-in sample
#   make test         set up .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= all
PYTEST_ARGS ?=

.PHONY: setup quickstart test demo clean

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

clean:
	rm -rf runs .kimchi-edge .pytest_cache test-artifacts
