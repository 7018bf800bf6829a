# One command surface for README, CI and developers.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
WEIGHTS := weights/vgg16_lpips.pt
SHARED_TRAIN := ../shared/data/brats2015-deepmedic/train

.PHONY: setup test test-fast demo run lint openapi bench bench-service bench-quality bench-efficacy clean

setup: $(STAMP) $(WEIGHTS)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(WEIGHTS): $(STAMP) scripts/fetch_vgg16.py
	$(PY) scripts/fetch_vgg16.py --out $(WEIGHTS)

# The whole suite, slow (real-data, multi-process) tests included: what CI runs.
test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --durations=15

# Without the slow tests, for quick iterations.
test-fast: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not slow"

# Augment a cohort end to end: the shared BraTS training cases when present, else a phantom cohort.
demo: setup
	@if [ -d "$(SHARED_TRAIN)" ]; then cohort="$(SHARED_TRAIN)"; else \
	  $(PY) -c "from pathlib import Path; from models.phantoms import make_phantom_cohort; make_phantom_cohort(Path('data/phantom-cohort'))"; \
	  cohort=data/phantom-cohort; fi; \
	$(VENV)/bin/dhvae augment --cohort $$cohort --preset tiny --steps 30 --n-pairs 12 --seed 7 --out augmented

run: setup
	$(PY) scripts/run_service.py

lint: setup
	$(VENV)/bin/ruff check models worker service contract tests bench scripts

openapi: setup
	$(PY) -m service.openapi_export

bench: setup
	$(PY) bench/train_speed.py

bench-quality: setup
	$(PY) bench/small_quality.py --minutes 30

bench-service: setup
	$(PY) bench/service/bench_service.py

# GRID=full (the issue's grid; GPU-sized) or GRID=cpu (a pilot of the protocol; its U-Nets barely train)
bench-efficacy: setup
	$(PY) bench/efficacy/run.py --grid $(or $(GRID),cpu)

clean:
	rm -rf augmented .augmented.model .cache
