# Developer entry points. Every target creates the virtual environment first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch where there is no GPU (these machines keep 2.13.0 on disk).
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint typecheck proto proto-check mutation compose-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,proto]'
	touch $@

# Start the whole stack on this machine (store on disk, one CPU worker, router) with a tiny
# model and three adapters trained on this CPU at the first run (cached in .demo/), stream
# every model's answers to a few prompts, check them, stop. demo/__main__.py says more.
run: $(VENV)/.installed
	$(PY) -m demo

# The whole CPU suite: lint, types, generated-code freshness, tests.
test: $(VENV)/.installed lint typecheck
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# Mutation testing of the core modules (MUTATION.md), not part of `make test`: each module of
# tools/mutation/modules.toml against its own unit tests. MUTATION_ARGS picks modules and
# options, e.g. `make mutation MUTATION_ARGS="routing --max-children 2"`. Report:
# .mutation/report.md.
mutation: $(VENV)/.installed-dev
	$(PY) -m tools.mutation $(MUTATION_ARGS)

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,proto,dev]'
	touch $@

# The compose stack built and run for real, on the CPU (docker-compose.yml under
# docker-compose.cpu.yml), with `docker compose` or podman and podman-compose, installed when
# missing: health, an adapter uploaded, completions streamed, metrics, a container restarted,
# everything torn down. Not part of `make test` (minutes of image building); .ci/run runs it.
# tools/compose/compose_test.sh says more.
compose-test: $(VENV)/.installed-compose
	PY=$(PY) PODMAN_COMPOSE=$(VENV)/bin/podman-compose tools/compose/compose_test.sh

$(VENV)/.installed-compose: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,proto,compose]'
	touch $@

# Regenerate the committed gRPC modules from protos/.
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/manylora/v1/*.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .mutation
