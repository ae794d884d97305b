# msd-jax: `make demo` trains and evaluates on the built-in synthetic stone data; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
CONFIG ?= configs/msd.py:demo

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(PY) train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(PY) eval.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q --durations=15 tests

bench: install
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/train_step.py --config=demo
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
