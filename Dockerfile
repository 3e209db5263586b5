# One image for every manylora service; the command picks the service:
#   python -m services.router | services.gpu_worker | services.adapter_store
#   python -m services.openai_front                            (the OpenAI HTTP API, port 8000)
#   python -m services.client "prompt" --target HOST:PORT     (a client, for a quick try)
#   python -m services.common.healthcheck HOST:PORT SERVICE   (container health checks)
#   python -m services.common.token_cli new-key | mint ...    (authentication, see README)
# PyTorch and Triton are the versions the GPU paths are tested with (pyproject.toml's `gpu`
# extra: torch 2.11.0 with triton 3.6.0). Their wheels bring the CUDA 13 libraries; the host
# needs an NVIDIA driver that supports CUDA 13 (580 or newer) and the NVIDIA container toolkit.
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MANYLORA_HOST=0.0.0.0

# Triton compiles a small C launcher for its kernels when it first runs them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so that code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['optional-dependencies']['gpu'] + d['project']['dependencies']))" \
    > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY protos/ protos/
COPY services/ services/
COPY kernels/ kernels/
RUN pip install --no-deps . && python -c "import services.router, manylora.v1"

# Each service reads MANYLORA_* variables (see each service's --help).
EXPOSE 8000 50050 50051 50052 9100 9101 9102
CMD ["python", "-m", "services.router", "--help"]
