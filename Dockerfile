# One image for every manylora service; the command picks the service:
#   python -m services.router | services.gpu_worker | services.adapter_store
#   python -m services.openai_front                            (the OpenAI HTTP API, port 8000)
#   python -m services.client "prompt" --target HOST:PORT     (a client, for a quick try)
#   python -m services.common.healthcheck HOST:PORT SERVICE   (container health checks)
#   python -m services.common.token_cli new-key | mint ...    (authentication, see README)
#
# Build arguments:
#   BASE_IMAGE       any Debian-based image with python3 (3.11+) and its venv module; by default
#                    the official Python image. `make compose-test` passes a bare Debian image
#                    it makes with debootstrap, where no image registry can be reached.
#   TORCH_SPEC       empty (the default): PyTorch and Triton are the versions the GPU paths are
#                    tested with, pyproject.toml's `gpu` extra (torch 2.11.0 with triton 3.6.0),
#                    whose wheels bring the CUDA 13 libraries; the host needs an NVIDIA driver
#                    that supports CUDA 13 (580 or newer) and the NVIDIA container toolkit.
#                    Otherwise the torch to install instead of both, e.g. `torch==2.13.0+cpu`,
#                    the CPU build the CPU suite runs on (docker-compose.cpu.yml); the CPU runs
#                    no Triton kernel (the worker imports them on CUDA only).
#   TORCH_INDEX_URL  an extra package index to find TORCH_SPEC in (PyTorch's CPU index for the
#                    CPU build). Wheels put in tools/compose/wheels/ are found first, without one.
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_SPEC=""
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MANYLORA_HOST=0.0.0.0

# Triton compiles a small C launcher for its kernels when it first runs them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment, first on PATH (so `python` is its interpreter): Debian's own Python
# refuses packages installed system-wide with pip (PEP 668).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first, so that code (and README) changes do not reinstall them.
COPY pyproject.toml ./
COPY tools/compose/wheels/ /tmp/wheels/
RUN python -c "import os, tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
gpu = d['project']['optional-dependencies']['gpu']; torch = os.environ['TORCH_SPEC']; \
pins = [torch] if torch else gpu; \
print('\n'.join(pins + d['project']['dependencies']))" \
    > /tmp/requirements.txt \
    && pip install --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt \
    && rm -rf /tmp/wheels
COPY README.md ./
COPY protos/ protos/
COPY services/ services/
COPY kernels/ kernels/
RUN pip install --no-deps . && python -c "import services.router, manylora.v1"

# Each service reads MANYLORA_* variables (see each service's --help).
EXPOSE 8000 50050 50051 50052 9100 9101 9102 9103
CMD ["python", "-m", "services.router", "--help"]
