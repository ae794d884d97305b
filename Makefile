# msd-jax: `make demo` trains and evaluates on the built-in synthetic stone data; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
CONFIG ?= configs/msd.py:demo

.PHONY: install demo magnetic_tile test bench clean

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

# Magnetic Tile (../shared/data/magnetic_tile or MT_ROOT=...): the demo model at 128 px (scorer
# input 256 px, map sigma 2 px: the paper's 4 at 256 px), 300 VAE + 1200 MSD steps, no perceptual
# term; about 40 minutes on 2 CPU cores.
# Results: README.md.
MT_ROOT ?= ../shared/data/magnetic_tile
MT_WORKDIR ?= workdirs/magnetic_tile
MT_FLAGS := --config.data.kind=magnetic_tile --config.data.root=$(MT_ROOT) \
	--config.data.image_size=128 --config.stages.vae.num_steps=300 \
	--config.stages.msd.num_steps=1200 --config.eval.every_steps=400 \
	--config.train.checkpoint_every=400 --config.model.scorer.input_scale=2 \
	--config.model.scorer.sigma=2 --config.stages.msd.perceptual_weight=0

magnetic_tile: install
	$(PY) train.py --config=configs/msd.py:demo --workdir=$(MT_WORKDIR) $(MT_FLAGS)
	$(PY) eval.py --workdir=$(MT_WORKDIR)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: install
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/scoring.py
	$(PY) benchmarks/train_step.py --config=demo
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
