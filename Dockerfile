# One image for every manylora service; the command picks the service:
#   python -m services.router | services.gpu_worker | services.adapter_store
#   python -m services.openai_front                            (the OpenAI HTTP API, port 8000)
#   python -m services.client "prompt" --target HOST:PORT     (a client, for a quick try)
#   python -m services.common.healthcheck HOST:PORT SERVICE   (container health checks)
# The base is a CUDA build of PyTorch (the worker needs it; the store uses torch to validate
# adapters). Any PyTorch >= 2.4 image with Python >= 3.11 works:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> .
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MANYLORA_HOST=0.0.0.0

WORKDIR /app
# Dependencies first, so that code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY protos/ protos/
COPY services/ services/
COPY kernels/ kernels/
RUN pip install --no-deps . && python -c "import services.router, manylora.v1"

# Each service reads MANYLORA_* variables (see each service's --help).
EXPOSE 8000 50050 50051 50052 9100 9101 9102
CMD ["python", "-m", "services.router", "--help"]
