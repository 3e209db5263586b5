"""The router's one summary line per request, and its per-adapter counters under bounded
labels, through the real stack: checked against what each client asked for and received."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from services.client import AsyncManyloraClient, ManyloraError
from services.common.grpc_server import free_port
from services.common.logging import FIELDS_ATTR, JsonFormatter, RequestIdFilter, TextFormatter
from services.common.metrics import BoundedLabels
from services.router.request_summary import SUMMARY_MESSAGE
from tests.e2e.stack import Stack
from tests.e2e.test_metrics import scrape
from tests.security.conftest import random_adapter

PROMPT_TOKENS = 6  # "hello" in the tiny model's byte tokenizer, and its <s>
OTHER, BASE = BoundedLabels.OTHER, BoundedLabels.BASE


def summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == SUMMARY_MESSAGE]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, FIELDS_ATTR))


async def test_summary_lines_and_per_adapter_counters(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="services.router.request_summary")
    caplog.handler.addFilter(RequestIdFilter())
    await stack.start_store()
    await stack.upload(
        {name: random_adapter(tmp_path / name, seed=i) for i, name in enumerate("abc")}
    )
    await stack.start_worker()
    metrics_port = free_port()
    router = await stack.start_router(metrics_port=metrics_port, metrics_adapter_labels=2)
    async with AsyncManyloraClient(f"127.0.0.1:{router.port}", timeout=60) as client:
        with pytest.raises(ManyloraError):  # an unknown id first: it must not take a label
            await client.complete("hello", adapter="zz", max_new_tokens=4)
        done = {}
        for adapter, n in (("a", 4), ("b", 3), ("c", 5), ("a@1", 2), ("", 4)):
            done[adapter] = await client.complete(
                "hello", adapter=adapter, max_new_tokens=n, ignore_eos=True
            )
        stream = client.generate("hello", adapter="a", max_new_tokens=500, ignore_eos=True)
        await anext(stream)
        await stream.aclose()  # the client leaves: CANCELLED
    async with asyncio.timeout(10):
        while len(summaries(caplog)) < 7:
            await asyncio.sleep(0.02)

    lines = [fields(r) for r in summaries(caplog)]
    assert [(f["adapter"], f["status"]) for f in lines] == [
        ("zz", "NOT_FOUND"),
        ("a", "OK"),
        ("b", "OK"),
        ("c", "OK"),
        ("a", "OK"),
        ("", "OK"),
        ("a", "CANCELLED"),
    ]
    for line, (adapter, completion) in zip(lines[1:6], done.items(), strict=True):
        assert line["adapter_version"] == (1 if adapter else 0)
        assert line["generated_tokens"] == len(completion.token_ids)
        assert line["prompt_tokens"] == PROMPT_TOKENS and line["finish_reason"] == "length"
        assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert lines[0]["generated_tokens"] == 0 and lines[0]["ttft_ms"] is None
    cancelled = lines[6]
    assert cancelled["generated_tokens"] >= 1 and cancelled["prompt_tokens"] is None
    records = summaries(caplog)
    request_ids = [r.request_id for r in records[1:6]]  # type: ignore[attr-defined]
    assert request_ids == [c.request_id for c in done.values()]
    as_json = json.loads(JsonFormatter().format(records[1]))
    assert as_json["request_id"] == done["a"].request_id and as_json["adapter"] == "a"
    assert as_json["generated_tokens"] == 4 and as_json["status"] == "OK"
    text = TextFormatter().format(records[0])
    assert "adapter=zz" in text and "status=NOT_FOUND" in text and "ttft_ms=None" in text

    samples = await asyncio.to_thread(scrape, metrics_port)

    def counted(name: str, **labels: str) -> float:
        return samples.get((f"manylora:{name}_total", tuple(sorted(labels.items()))), 0.0)

    assert counted("adapter_requests", adapter="a", code="OK") == 2
    assert counted("adapter_requests", adapter="a", code="CANCELLED") == 1
    assert counted("adapter_requests", adapter="b", code="OK") == 1
    assert counted("adapter_requests", adapter=OTHER, code="OK") == 1  # c came third
    assert counted("adapter_requests", adapter=OTHER, code="NOT_FOUND") == 1
    assert counted("adapter_requests", adapter=BASE, code="OK") == 1
    generated_a = len(done["a"].token_ids) + len(done["a@1"].token_ids)
    assert (
        counted("adapter_generation_tokens", adapter="a")
        == generated_a + cancelled["generated_tokens"]
    )
    assert counted("adapter_generation_tokens", adapter=OTHER) == 5
    assert counted("adapter_prompt_tokens", adapter="a") == 2 * PROMPT_TOKENS
    assert counted("adapter_prompt_tokens", adapter=BASE) == PROMPT_TOKENS
    labels = {
        dict(key)["adapter"] for (name, key) in samples if name == "manylora:adapter_requests_total"
    }
    assert labels == {"a", "b", OTHER, BASE}


def test_bounded_labels_never_exceed_their_limit():
    labels = BoundedLabels(3)
    seen = {labels.label(f"id{i}", succeeded=i % 2 == 0) for i in range(1000)}
    assert seen == {"id0", "id2", "id4", OTHER}
    assert labels.label("id1", succeeded=True) == OTHER  # full: later successes share OTHER
    assert labels.label("id2", succeeded=False) == "id2"  # a labelled id keeps its label
    assert labels.label("", succeeded=True) == BASE
