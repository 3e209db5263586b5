"""What `make compose-test` checks against a running compose stack, from the host, through the
ports compose publishes on 127.0.0.1 (tools/compose/compose_test.sh runs each step):

    python -m tools.compose.check upload              the store CLI uploads a random adapter
    python -m tools.compose.check serve               a stream through the router and the front
    python -m tools.compose.check metrics WORKER.prom every service's Prometheus metrics

Each step prints what it saw and exits 1 with one line saying what was wrong.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from openai import OpenAI, OpenAIError  # the test extra's: an independent HTTP and SSE client
from prometheus_client.parser import text_string_to_metric_families

from services.client import ManyloraClient, ManyloraError
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter

ADAPTER = "compose-check"
MODEL = "tiny"  # the worker's model in docker-compose.cpu.yml
PROMPT = "Hello from compose"
NEW_TOKENS = 12
ROUTER = "127.0.0.1:50050"
STORE = "127.0.0.1:50052"
FRONT = "http://127.0.0.1:8000/v1"
METRICS_PORTS = {"router": 9100, "adapter_store": 9102, "openai_front": 9103}
TIMEOUT_S = 60.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class CheckFailed(Exception):
    """What the stack did wrong, in one line."""


def upload() -> None:
    """A random rank-8 adapter for the tiny model, uploaded with the store's CLI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_peft_adapter(
            Path(tmp) / ADAPTER, BaseModelShape.from_hf_config(load_hf_config(MODEL)), 8, seed=7
        )
        command = [sys.executable, "-m", "services.adapter_store.cli", "upload", str(folder)]
        result = subprocess.run(
            [*command, "--target", STORE], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    if result.returncode != 0:
        raise CheckFailed(f"the store CLI's upload failed: {result.stderr.strip()}")
    print(result.stdout.strip())
    if not result.stdout.startswith(f"uploaded {ADAPTER} v1:"):
        raise CheckFailed(f"the upload answered {result.stdout.strip()!r}")


def serve() -> None:
    """The adapter's greedy completion streamed through the router (gRPC), then the same request
    streamed through the OpenAI front (HTTP, with the official client): the front relays the
    router, so both must give the same text."""
    with ManyloraClient(ROUTER, timeout=TIMEOUT_S) as client:
        chunks = list(
            client.generate(PROMPT, adapter=ADAPTER, max_new_tokens=NEW_TOKENS, temperature=0.0)
        )
    text = "".join(chunk.text for chunk in chunks)
    last = chunks[-1]
    if last.usage is None or last.finish_reason is None:
        raise CheckFailed(f"the router's stream ended without usage or a finish reason: {last}")
    served_by = {chunk.adapter_version for chunk in chunks}
    print(
        f"router: {len(chunks)} chunks, {last.usage.completion_tokens} tokens, "
        f"finish {last.finish_reason}, adapter versions {sorted(served_by)}: {text!r}"
    )
    if served_by != {1}:
        raise CheckFailed(f"{ADAPTER} v1 was uploaded, yet versions {served_by} served it")
    if last.finish_reason == "length" and last.usage.completion_tokens != NEW_TOKENS:
        raise CheckFailed(f"{last.usage.completion_tokens} tokens, {NEW_TOKENS} asked for")

    front = OpenAI(base_url=FRONT, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    events = list(
        front.completions.create(
            model=ADAPTER, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0.0, stream=True
        )
    )
    front_text = "".join(choice.text for event in events for choice in event.choices)
    print(f"OpenAI front: {len(events)} events: {front_text!r}")
    if front_text != text:
        raise CheckFailed(f"the front streamed {front_text!r}, the router {text!r}")


def scrape(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= set(have)
    )


def metrics(worker_file: Path) -> None:
    """What the upload and the streams must have left in every service's counters (the worker's
    scraped inside its container, as compose publishes no port of it)."""
    seen: dict[str, Samples] = {"gpu_worker": scrape(worker_file.read_text())}
    for service, port in METRICS_PORTS.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            seen[service] = scrape(reply.read().decode())
    wanted = [
        ("router", "manylora:generation_tokens_total", {}),
        ("router", "manylora:router_workers", {"state": "healthy"}),
        ("router", "manylora:adapter_requests_total", {"adapter": ADAPTER, "code": "OK"}),
        ("gpu_worker", "manylora:generation_tokens_total", {}),
        (
            "adapter_store",
            "manylora:rpc_requests_total",
            {"method": "UploadAdapter", "code": "OK"},
        ),
        ("adapter_store", "manylora:rpc_requests_total", {"method": "FetchAdapter", "code": "OK"}),
        (
            "openai_front",
            "manylora:http_requests_total",
            {"route": "/v1/completions", "status": "200"},
        ),
    ]
    for service, name, labels in wanted:
        value = total(seen[service], name, **labels)
        print(f"{service}: {name}{labels or ''} = {value:g}")
        if value < 1:
            raise CheckFailed(f"{service}'s {name}{labels or ''} is {value:g}, expected >= 1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.compose.check", description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("upload")
    steps.add_parser("serve")
    scrape_step = steps.add_parser("metrics")
    scrape_step.add_argument("worker_file", type=Path, help="the worker's /metrics, scraped")
    args = parser.parse_args(argv)
    try:
        if args.step == "upload":
            upload()
        elif args.step == "serve":
            serve()
        else:
            metrics(args.worker_file)
    except (CheckFailed, ManyloraError, OpenAIError, OSError) as exc:  # OSError: urllib's
        print(f"compose check {args.step}: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
