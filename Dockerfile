# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target api    -t dhvae-api .      FastAPI + uvicorn; no torch (validates uploads torch-free)
#   docker build --target worker -t dhvae-worker .   Celery worker with CUDA torch and the VGG16 weights
# docker-compose.yml builds both. Runtime settings: DHVAE_* environment variables (.env.example).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DHVAE_DATA_DIR=/data
RUN useradd --create-home --uid 10001 dhvae && mkdir -p /data && chown dhvae /data
WORKDIR /app

# ---------------------------------------------------------------------------------------------- api
FROM base AS api-deps
COPY requirements.lock ./
# everything pinned in the runtime lock but the deep-learning stack and the efficacy metrics' scikit-image
# (the dev tools have their own lock)
RUN grep -v -E '^(torch|monai|scikit-image|triton|nvidia-)' requirements.lock > requirements-api.txt \
 && pip install -r requirements-api.txt

FROM api-deps AS api
COPY pyproject.toml ./
# the API's packages only: the wire format, the shared runtime and the torch-free imaging I/O
# (tests/test_imports.py proves that loading any of their modules leaves torch out)
COPY contract ./contract
COPY runtime ./runtime
COPY imaging ./imaging
COPY service ./service
RUN pip install --no-deps . && python -c "import service.main"
USER dhvae
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live')"
CMD ["uvicorn", "service.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------- worker
FROM base AS worker-deps
# CUDA build of the pinned torch (the wheel bundles the CUDA runtime; the host needs only the driver
# and the NVIDIA container toolkit)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
COPY requirements.lock ./
RUN torch_pin=$(grep -E '^torch==' requirements.lock) \
 && pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "${torch_pin}" \
 && grep -v -E '^torch==' requirements.lock > requirements-worker.txt \
 && pip install -r requirements-worker.txt

FROM worker-deps AS worker
COPY pyproject.toml ./
COPY contract ./contract
COPY runtime ./runtime
COPY imaging ./imaging
COPY models ./models
COPY pipeline ./pipeline
COPY efficacy ./efficacy
COPY worker ./worker
COPY scripts/fetch_vgg16.py ./scripts/fetch_vgg16.py
RUN pip install --no-deps . \
 && python scripts/fetch_vgg16.py --out weights/vgg16_lpips.pt \
 && python -c "import worker.celery_app"
USER dhvae
# one process per GPU: scale with `docker compose up --scale worker=N`
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=prefork", "--concurrency=1", "--loglevel=INFO"]
