# One command surface for README, CI and developers.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
WEIGHTS := weights/vgg16_lpips.pt
SHARED_TRAIN := ../shared/data/brats2015-deepmedic/train

.PHONY: bench-cv browser setup test test-fast check lint format demo run openapi bench bench-service bench-quality bench-efficacy clean

setup: $(STAMP) $(WEIGHTS)

# The runtime lock (what the Docker images install) plus the development tools' lock.
$(STAMP): pyproject.toml client/pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e . -e client
	touch $(STAMP)

$(WEIGHTS): $(STAMP) scripts/fetch_vgg16.py
	$(PY) scripts/fetch_vgg16.py --out $(WEIGHTS)

# What the style promises, checked: lint, formatting, types, and the import rules of docs/architecture.md.
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# Debian's chromium for the browser tests (Playwright drives it; nothing downloads a browser build).
browser:
	@test -x /usr/bin/chromium || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null))

# `make check`, then the whole suite, slow (real-data, multi-process, browser) tests included: what CI runs.
test: check browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# Without the slow tests, for quick iterations: two test processes of one torch thread each (2 cores,
# no oversubscription), under 90 s on 2 idle cores.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2 --durations=10

# Augment a cohort end to end: the shared BraTS training cases when present, else a phantom cohort.
demo: setup
	@if [ -d "$(SHARED_TRAIN)" ]; then cohort="$(SHARED_TRAIN)"; else \
	  $(PY) -c "from pathlib import Path; from imaging.phantoms import make_phantom_cohort; make_phantom_cohort(Path('data/phantom-cohort'))"; \
	  cohort=data/phantom-cohort; fi; \
	$(VENV)/bin/dhvae augment --cohort $$cohort --preset tiny --steps 30 --n-pairs 12 --seed 7 --out augmented

run: setup
	$(PY) scripts/run_service.py

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .

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

# The cross-validated comparison (issue 11): resumable, hours on 2 CPU cores.
bench-cv: setup
	OMP_NUM_THREADS=2 $(PY) bench/efficacy/cv.py $(CV_ARGS)

clean:
	rm -rf augmented .augmented.model .cache
