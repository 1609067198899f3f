# Two commands on a fresh machine (see README.md):
#   make demo   set up .venv and run the main job: the full Kubeflow pipeline on the tiny CPU config, locally
#               through kfp.local, logging to the embedded MLflow store
#   make test   set up .venv and run the test suite plus the linter
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lives on these machines; installed before anything that depends on torch, so that pip
# never resolves a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= configs/tiny-cpu.yaml

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/refine pipeline run --config $(DEMO_CONFIG)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache .ruff_cache
