"""Hostile generation requests through the public API (router -> worker -> store), each sent
while other clients stream: every attack gets its own status with a short message, and the
other streams complete with exactly the tokens they get when run alone. Faults too: the
store down (one adapter unreachable), a worker frozen mid-stream (SIGSTOP)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.errors import MAX_STATUS_DETAILS_BYTES
from services.common.random_adapters import save_random_peft_adapter
from tests.e2e.stack import Stack, poll_stats, worker_stats
from tests.processes import ServiceProcess

OK = "ok"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROMPT = "the quick brown fox"
NEW = 24
LONG = 64  # bystanders' tokens: enough that they stream while the attacks run
U32, U64 = 2**32 - 1, 2**64 - 1


def params(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"max_new_tokens": NEW, "ignore_eos": True, **fields})  # type: ignore[arg-type]


def request(**fields: object) -> common_pb2.GenerateRequest:
    base: dict[str, object] = {"prompt": PROMPT, "params": params()}
    return common_pb2.GenerateRequest(**{**base, **fields})  # type: ignore[arg-type]


def token_ids(**fields: object) -> common_pb2.GenerateRequest:
    ids = fields.pop("ids")
    return request(prompt_token_ids=common_pb2.PromptTokenIds(ids=ids), **fields)  # type: ignore[arg-type]


@dataclass
class Outcome:
    code: grpc.StatusCode | str = OK
    details: str = ""
    tokens: list[int] = field(default_factory=list)
    request_ids: set[str] = field(default_factory=set)


async def run(call: grpc.aio.UnaryStreamCall) -> Outcome:
    outcome = Outcome()
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            outcome.tokens += response.token_ids
            outcome.request_ids.add(response.request_id)
    except grpc.aio.AioRpcError as exc:
        outcome.code, outcome.details = exc.code(), exc.details() or ""
    except asyncio.CancelledError:
        if not call.cancelled():  # this task itself is being cancelled
            raise
        outcome.code = grpc.StatusCode.CANCELLED
    return outcome


def raw_generate(
    channel: grpc.aio.Channel, service: str
) -> Callable[..., grpc.aio.UnaryStreamCall]:
    """Generate taking the request's bytes as they are, so that they can be invalid."""
    return channel.unary_stream(
        f"/manylora.v1.{service}/Generate",
        request_serializer=lambda data: data,
        response_deserializer=common_pb2.GenerateResponse.FromString,
    )


def with_bad_utf8(message: common_pb2.GenerateRequest, marker: str) -> bytes:
    data = message.SerializeToString()
    return data.replace(marker.encode(), b"\xc3\x28" + b"x" * (len(marker) - 2))


async def upload_random(stack: Stack, tmp: Path, ids: list[str]) -> None:
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    folders = {i: save_random_peft_adapter(tmp / i, shape, 8, seed=n) for n, i in enumerate(ids)}
    await stack.upload(folders)


def bystanders() -> list[common_pb2.GenerateRequest]:
    """Other clients: greedy on the base model, greedy with an adapter, seeded sampling."""
    return [
        request(request_id="bystander-0", params=params(max_new_tokens=LONG)),
        request(request_id="bystander-1", adapter_id="ad", params=params(max_new_tokens=LONG)),
        request(
            request_id="bystander-2",
            adapter_id="ad",
            params=params(max_new_tokens=LONG, temperature=0.8, seed=7),
        ),
    ]


async def stream_while(
    stub: router_pb2_grpc.RouterStub, others: list[common_pb2.GenerateRequest], attack
) -> tuple[list[Outcome], object]:
    """Start `others`, run `attack()` once each has its first tokens, then finish them."""
    calls = [stub.Generate(r, timeout=60) for r in others]
    firsts = [await call.read() for call in calls]
    attacked = await attack()
    rests = await asyncio.gather(*(run(call) for call in calls))
    for first, rest in zip(firsts, rests, strict=True):
        rest.tokens[:0] = first.token_ids
        rest.request_ids.add(first.request_id)
    return rests, attacked


# --- hostile fields ------------------------------------------------------------------------

ATTACKS: list[tuple[str, common_pb2.GenerateRequest, grpc.StatusCode | str]] = [
    ("subnormal temperature", request(params=params(max_new_tokens=LONG, temperature=1e-45)), OK),
    (
        "extreme but valid",
        request(params=params(temperature=3e38, top_p=1e-45, top_k=U32, seed=U64, logprobs=True)),
        OK,
    ),
    ("NaN temperature", request(params=params(temperature=float("nan"))), INVALID),
    ("inf temperature", request(params=params(temperature=float("inf"))), INVALID),
    ("negative temperature", request(params=params(temperature=-1.0)), INVALID),
    ("NaN top_p", request(params=params(top_p=float("nan"))), INVALID),
    ("top_p above 1", request(params=params(top_p=1.0000001)), INVALID),
    ("no max_new_tokens", request(params=common_pb2.SamplingParams()), INVALID),
    ("request_id 10k", request(request_id="r" * 10_000), INVALID),
    ("request_id 20k", request(request_id="r" * 20_000), INVALID),
    ("request_id newline", request(request_id="evil\r\nx-injected: 1"), INVALID),
    ("adapter_id 20k", request(adapter_id="a" * 20_000), INVALID),
    ("adapter_id path", request(adapter_id="../../etc"), INVALID),
    ("adapter unknown", request(adapter_id="nope"), grpc.StatusCode.NOT_FOUND),
    ("17 stop strings", request(params=params(stop=["z"] * 17)), INVALID),
    ("huge stop string", request(params=params(stop=["z" * 100_000])), INVALID),
    ("many stop ids", request(params=params(stop_token_ids=[5] * 10_000)), INVALID),
    ("stop id max uint", request(params=params(stop_token_ids=[U32])), INVALID),
    ("empty stop strings", request(params=params(stop=[""] * 16)), OK),
    ("no input", common_pb2.GenerateRequest(params=params()), INVALID),
    ("empty prompt", request(prompt=""), INVALID),
    ("2 MiB prompt", request(prompt="p" * (2 << 20)), INVALID),
    ("no token ids", token_ids(ids=[]), INVALID),
    ("200k token ids", token_ids(ids=[5] * 200_000), INVALID),
    ("token id max uint", token_ids(ids=[5, U32]), INVALID),
    ("prompt past context", token_ids(ids=[5] * 1024), INVALID),
    ("max uint new tokens", request(params=params(max_new_tokens=U32)), "cancel"),
]


async def test_hostile_fields_fail_alone_while_others_stream(hostile_stack: Stack, tmp_path):
    stack = hostile_stack
    await stack.start_store()
    await upload_random(stack, tmp_path, ["ad"])
    worker = await stack.start_worker()
    router = await stack.start_router()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        alone = [await run(stub.Generate(r, timeout=60)) for r in bystanders()]
        assert all(o.code == OK and len(o.tokens) == LONG for o in alone)

        async def attack() -> list[Outcome]:
            calls = [stub.Generate(r, timeout=60) for _, r, _ in ATTACKS]
            outcomes = []
            for call, (_, _, expected) in zip(calls, ATTACKS, strict=True):
                if expected == "cancel":  # runs to the context length unless cancelled
                    await call.read()
                    call.cancel()
                outcomes.append(await run(call))
            return outcomes

        others, attacked = await stream_while(stub, bystanders(), attack)
        assert isinstance(attacked, list)
        for (name, _, expected), outcome in zip(ATTACKS, attacked, strict=True):
            if expected == "cancel":
                assert outcome.code == grpc.StatusCode.CANCELLED, name
                continue
            assert outcome.code == expected, (name, outcome.code, outcome.details)
            assert len(outcome.details) <= MAX_STATUS_DETAILS_BYTES // 4, name
        # The subnormal temperature is greedy: the base bystander's tokens.
        assert attacked[0].tokens == alone[0].tokens
        for before, after in zip(alone, others, strict=True):
            assert after.code == OK and after.tokens == before.tokens
        assert [o.request_ids for o in others] == [{f"bystander-{i}"} for i in range(3)]
        assert [h.address for h in router.pool.eligible()] == [f"127.0.0.1:{worker.port}"]
    await poll_stats(worker, lambda s: s.running_requests == s.waiting_requests == s.kv_slots == 0)


async def test_invalid_utf8_is_invalid_argument_at_router_and_worker(hostile_stack: Stack):
    stack = hostile_stack
    await stack.start_store()
    worker = await stack.start_worker()
    router = await stack.start_router()
    cases = [
        (request(prompt="PROMPTX"), "PROMPTX", "prompt"),
        (request(request_id="RIDX"), "RIDX", "request_id"),
        (request(params=params(stop=["ok", "STOPX"])), "STOPX", "params.stop[1]"),
    ]
    for port, service in ((router.port, "Router"), (worker.port, "GpuWorker")):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            generate = raw_generate(channel, service)
            for message, marker, name in cases:
                outcome = await run(generate(with_bad_utf8(message, marker), timeout=30))
                assert outcome.code == INVALID, (service, name, outcome)
                assert outcome.details.startswith(f"{name} is not valid UTF-8"), outcome.details
            garbage = await run(generate(b"\xff" * 100, timeout=30))
            assert garbage.code == INVALID and "not a valid" in garbage.details
            good = request(params=params(max_new_tokens=2)).SerializeToString()
            fine = await run(generate(good, timeout=30))
            assert fine.code == OK and len(fine.tokens) == 2


# --- ids, cancellation and deadlines ---------------------------------------------------------


async def test_shared_request_ids_cancel_storms_and_1ms_deadlines(hostile_stack: Stack, tmp_path):
    stack = hostile_stack
    await stack.start_store()
    await upload_random(stack, tmp_path, ["ad"])
    worker = await stack.start_worker()
    router = await stack.start_router()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        alone = [await run(stub.Generate(r, timeout=60)) for r in bystanders()]

        async def attack() -> list[Outcome]:
            # Another client takes every bystander's id, then cancels: only its own stream ends.
            thieves = [stub.Generate(r, timeout=60) for r in bystanders()]
            for thief in thieves:
                await thief.read()
                thief.cancel()
            storm = [stub.Generate(request(request_id="storm"), timeout=60) for _ in range(30)]
            for i, call in enumerate(storm):
                if i % 2:
                    await call.read()
                call.cancel()
            hurried = [stub.Generate(request(), timeout=0.001) for _ in range(10)]
            return [await run(c) for c in [*thieves, *storm, *hurried]]

        others, attacked = await stream_while(stub, bystanders(), attack)
        assert isinstance(attacked, list)
        assert {o.code for o in attacked[:33]} == {grpc.StatusCode.CANCELLED}
        assert {o.code for o in attacked[33:]} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        for before, after in zip(alone, others, strict=True):
            assert after.code == OK and after.tokens == before.tokens
        assert router.pool.eligible()
    await poll_stats(worker, lambda s: s.running_requests == s.waiting_requests == s.kv_slots == 0)


# --- faults ----------------------------------------------------------------------------------


async def test_store_down_fails_only_the_uncached_adapters_requests(hostile_stack: Stack, tmp_path):
    stack = hostile_stack
    await stack.start_store()
    await upload_random(stack, tmp_path, ["ad", "uncached"])
    worker = await stack.start_worker()
    # Polls far apart: a worker wrongly marked failed would stay out for the whole test.
    router = await stack.start_router(health_interval_s=60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        alone = [await run(stub.Generate(r, timeout=60)) for r in bystanders()]  # caches "ad"
        assert stack.store is not None
        await stack.store.stop(grace=None)
        stack.store = None

        async def attack() -> list[Outcome]:
            calls = [stub.Generate(request(adapter_id="uncached"), timeout=60) for _ in range(3)]
            return [await run(c) for c in calls]

        others, attacked = await stream_while(stub, bystanders(), attack)
        assert isinstance(attacked, list)
        for outcome in attacked:
            assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
            assert "uncached" in outcome.details and "store" in outcome.details
            assert "no healthy worker" not in outcome.details
        for before, after in zip(alone, others, strict=True):
            assert after.code == OK and after.tokens == before.tokens
        # The worker still gets work: new requests right away succeed.
        assert [h.address for h in router.pool.eligible()] == [f"127.0.0.1:{worker.port}"]
        again = [await run(stub.Generate(r, timeout=60)) for r in bystanders()]
        assert [o.tokens for o in again] == [o.tokens for o in alone]


@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["frozen", "killed"])
async def test_a_frozen_or_killed_worker_ends_its_streams_and_the_other_serves(
    hostile_stack: Stack, worker_process: Callable[[list[str]], ServiceProcess], fault
):
    stack = hostile_stack
    await stack.start_store()
    victim = worker_process(["--adapter-store", stack.store_address])
    survivor = await stack.start_worker()
    await victim.wait_serving()
    router = await stack.start_router(
        workers=[victim.address, f"127.0.0.1:{survivor.port}"],
        health_timeout_s=0.5,
        worker_liveness_timeout_s=2.0,
    )
    streams = request(params=params(max_new_tokens=200))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        alone = await run(stub.Generate(streams, timeout=60))
        assert alone.code == OK and len(alone.tokens) == 200
        # Base-model requests go to the least loaded worker: two on each.
        calls, firsts = [], []
        for _ in range(4):
            calls.append(stub.Generate(streams, timeout=60))
            firsts.append(list((await calls[-1].read()).token_ids))
        assert (await worker_stats(survivor)).running_requests == 2
        victim.signal(fault)
        loop = asyncio.get_running_loop()
        began = loop.time()
        outcomes = await asyncio.gather(*(run(c) for c in calls))
        waited = loop.time() - began
        codes = Counter(o.code for o in outcomes)
        assert codes == {OK: 2, grpc.StatusCode.UNAVAILABLE: 2}, codes
        for first, outcome in zip(firsts, outcomes, strict=True):
            if outcome.code == OK:
                assert first + outcome.tokens == alone.tokens
            else:
                assert "mid-stream" in outcome.details
        # Ended by the liveness bound (2 s), far before the clients' 60 s deadline.
        assert waited < 30
        assert [h.address for h in router.pool.eligible()] == [f"127.0.0.1:{survivor.port}"]
        for _ in range(3):
            outcome = await run(stub.Generate(request(params=params(max_new_tokens=4)), timeout=20))
            assert outcome.code == OK and len(outcome.tokens) == 4
