"""One request id on every log line a request causes, in the router, the worker and the store."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.logging import RequestIdFilter
from services.common.random_adapters import save_random_peft_adapter
from tests.e2e.stack import Stack


async def test_request_id_reaches_every_service_log(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    await stack.start_store()
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    await stack.upload({"ad": save_random_peft_adapter(tmp_path / "ad", shape, 8, seed=1)})
    await stack.start_worker()
    router = await stack.start_router()
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO)
    request = common_pb2.GenerateRequest(
        request_id="trace-me-42",
        adapter_id="ad",
        prompt="hi",
        params=common_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        responses = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]
    assert responses[-1].finish_reason == common_pb2.LENGTH
    traced = {
        r.name.split(".")[1]
        for r in caplog.records
        if getattr(r, "request_id", None) == "trace-me-42"
    }
    assert {"router", "gpu_worker", "adapter_store"} <= traced, traced
