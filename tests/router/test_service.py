"""The Router over real sockets with fake workers: relaying, validation, adapter checks,
retries, failures mid-stream, queue bound, deadlines, cancellation and routing."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.errors import REQUEST_FAILURE, WORKER_FAILURE
from services.router.server import RouterServer
from tests.router.fakes import FakeStore, serve_fake_store


def request(
    adapter: str = "", request_id: str = "", **params: object
) -> common_pb2.GenerateRequest:
    params.setdefault("max_new_tokens", 3)
    return common_pb2.GenerateRequest(
        request_id=request_id,
        adapter_id=adapter,
        prompt="hi",
        params=common_pb2.SamplingParams(**params),  # type: ignore[arg-type]
    )


async def collect(stub, req, timeout: float = 10.0) -> list[common_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(req, timeout=timeout)]


async def drain(call) -> list[common_pb2.GenerateResponse]:
    """The rest of a call already read with `read()` (the two APIs may not be mixed)."""
    rest = []
    while (message := await call.read()) is not grpc.aio.EOF:
        rest.append(message)
    return rest


async def until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def channel_to():
    channels: list[grpc.aio.Channel] = []

    def make(router: RouterServer) -> router_pb2_grpc.RouterStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
        channels.append(channel)
        return router_pb2_grpc.RouterStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def test_relays_the_stream_and_forwards_the_request_id(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    stub = channel_to(await start_router_for([worker]))
    responses = await collect(stub, request(request_id="rid-1"))
    assert [r.text for r in responses] == ["a0 ", "a1 ", "a2 "]
    assert {r.request_id for r in responses} == {"rid-1"}
    assert responses[-1].finish_reason == common_pb2.LENGTH
    assert worker.seen[0].request.request_id == "rid-1"
    # An empty id is assigned by the router, and the worker sees the same one.
    responses = await collect(stub, request())
    assigned = responses[0].request_id
    assert assigned and worker.seen[1].request.request_id == assigned


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (request(max_new_tokens=0), "max_new_tokens"),
        (request(temperature=-0.5), "temperature"),
        (request(top_p=2.0), "top_p"),
        (request(stop=[str(i) for i in range(17)]), "stop"),
        (common_pb2.GenerateRequest(params=common_pb2.SamplingParams(max_new_tokens=1)), "prompt"),
        (
            common_pb2.GenerateRequest(
                prompt_token_ids=common_pb2.PromptTokenIds(ids=[]),
                params=common_pb2.SamplingParams(max_new_tokens=1),
            ),
            "prompt is empty",
        ),
    ],
)
async def test_bad_requests_are_refused_at_the_front(
    start_fakes, start_router_for, channel_to, req, needle
):
    (worker,) = await start_fakes(1)
    stub = channel_to(await start_router_for([worker]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")
    assert worker.seen == []


async def test_unknown_adapter_is_not_found_and_answers_are_cached(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    store = FakeStore(known={"known"})
    server = await serve_fake_store(store)
    try:
        router = await start_router_for([worker], adapter_store=f"127.0.0.1:{server.port}")
        stub = channel_to(router)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request("nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in (err.value.details() or "")
        for _ in range(5):
            await collect(stub, request("known"))
        assert store.info_calls == 2  # one lookup per adapter within the TTL
        assert [s.request.adapter_id for s in worker.seen] == ["known"] * 5
        listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest())
        assert [a.adapter_id for a in listed.adapters] == ["known"]
        # A store that cannot answer does not block requests: the worker decides.
        store.down = True
        await collect(stub, request("other"))
        assert worker.seen[-1].request.adapter_id == "other"
    finally:
        await server.stop(None)


async def test_a_pinned_version_is_checked_and_sent_on_as_id_and_version(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    server = await serve_fake_store(FakeStore(known={"known"}))
    try:
        stub = channel_to(
            await start_router_for([worker], adapter_store=f"127.0.0.1:{server.port}")
        )
        await collect(stub, request("known@1"))
        sent = worker.seen[-1].request
        assert (sent.adapter_id, sent.adapter_version) == ("known", 1)
        for adapter, version, code in (
            ("known@2", 0, grpc.StatusCode.NOT_FOUND),
            ("known", 2, grpc.StatusCode.NOT_FOUND),
            ("known@1", 2, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            req = request(adapter)
            req.adapter_version = version
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, req)
            assert err.value.code() == code, (adapter, version)
        assert len(worker.seen) == 1
    finally:
        await server.stop(None)


async def test_without_a_store_adapters_are_not_checked_and_listing_says_why(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    stub = channel_to(await start_router_for([worker]))
    await collect(stub, request("anything"))
    assert worker.seen[0].request.adapter_id == "anything"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListAdapters(common_pb2.ListAdaptersRequest())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_worker_failing_before_the_first_token_is_retried_elsewhere(
    start_fakes, start_router_for, channel_to
):
    a, b = await start_fakes(2)
    a.resident = ["x"]  # routing tries a first
    a.fail_first = [grpc.StatusCode.UNAVAILABLE]
    stub = channel_to(await start_router_for([a, b], health_interval_s=30))
    responses = await collect(stub, request("x"))
    assert responses[-1].finish_reason == common_pb2.LENGTH
    assert responses[0].text == "b0 "
    assert (len(a.seen), len(b.seen)) == (1, 1)
    # The failed worker gets no more work until a poll finds it healthy.
    await collect(stub, request("x"))
    assert (len(a.seen), len(b.seen)) == (1, 2)


async def test_only_one_retry_then_unavailable(start_fakes, start_router_for, channel_to):
    a, b, c = await start_fakes(3)
    for fake in (a, b, c):
        fake.fail_first = [grpc.StatusCode.UNAVAILABLE]
    stub = channel_to(await start_router_for([a, b, c], health_interval_s=30))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(a.seen) + len(b.seen) + len(c.seen) == 2


async def test_a_full_worker_queue_is_retried_elsewhere(start_fakes, start_router_for, channel_to):
    a, b = await start_fakes(2)
    a.resident = ["x"]
    a.fail_first = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    stub = channel_to(await start_router_for([a, b], health_interval_s=30))
    responses = await collect(stub, request("x"))
    assert responses[0].text == "b0 "
    # A full queue is no sign of ill health: a keeps its adapter's next request.
    responses = await collect(stub, request("x"))
    assert responses[0].text == "a0 "


async def test_worker_errors_about_the_request_pass_through_without_retry(
    start_fakes, start_router_for, channel_to
):
    a, b = await start_fakes(2)
    a.fail_first = [grpc.StatusCode.INVALID_ARGUMENT]
    b.fail_first = [grpc.StatusCode.INVALID_ARGUMENT]
    stub = channel_to(await start_router_for([a, b]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refuses" in (err.value.details() or "")
    assert len(a.seen) + len(b.seen) == 1


async def test_a_request_scoped_failure_passes_through_and_the_worker_keeps_its_health(
    start_fakes, start_router_for, channel_to
):
    a, b = await start_fakes(2)
    a.resident = ["x"]  # routing tries a first
    a.fail_first = [grpc.StatusCode.UNAVAILABLE]  # e.g. the store is down for this adapter
    a.fail_scope = REQUEST_FAILURE
    stub = channel_to(await start_router_for([a, b], health_interval_s=30))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request("x"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "a refuses"  # the worker's own reason, not "no healthy worker"
    assert (len(a.seen), len(b.seen)) == (1, 0)  # not retried elsewhere
    responses = await collect(stub, request("x"))  # a is still healthy: it gets the next one
    assert responses[0].text == "a0 "


async def test_a_worker_scoped_failure_counts_against_the_worker(
    start_fakes, start_router_for, channel_to
):
    a, b = await start_fakes(2)
    a.resident = ["x"]
    a.fail_first = [grpc.StatusCode.INTERNAL]  # e.g. its forward pass raised
    a.fail_scope = WORKER_FAILURE
    stub = channel_to(await start_router_for([a, b], health_interval_s=30))
    responses = await collect(stub, request("x"))
    assert responses[0].text == "b0 "
    await collect(stub, request("x"))
    assert (len(a.seen), len(b.seen)) == (1, 2)


async def test_failure_after_tokens_is_unavailable_with_a_clear_message(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1, tokens=5)
    worker.fail_after = 2
    stub = channel_to(await start_router_for([worker]))
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for r in stub.Generate(request(), timeout=10):
            got.append(r.text)
    assert got == ["a0 ", "a1 "]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "mid-stream after 2 messages" in (err.value.details() or "")
    assert "retry" in (err.value.details() or "")


async def test_no_healthy_worker_is_unavailable(start_fakes, start_router_for, channel_to):
    (worker,) = await start_fakes(1)
    router = await start_router_for([worker])
    await worker.set_serving(False)
    await until(lambda: not router.pool.eligible())
    stub = channel_to(router)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy worker" in (err.value.details() or "")
    assert worker.seen == []
    await worker.set_serving(True)  # and back
    await until(lambda: bool(router.pool.eligible()))
    assert (await collect(stub, request()))[-1].finish_reason == common_pb2.LENGTH


async def test_full_queue_is_resource_exhausted_at_once(start_fakes, start_router_for, channel_to):
    (worker,) = await start_fakes(1)
    worker.gate = asyncio.Event()
    router = await start_router_for([worker], max_running=1, max_queued=1)
    stub = channel_to(router)
    running = stub.Generate(request(), timeout=10)
    await running.read()  # relayed: holds the one running slot
    queued = stub.Generate(request(), timeout=10)
    await until(lambda: _queued(router) == 1)
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - start < 1.0
    worker.gate.set()
    assert (await drain(running))[-1].finish_reason == common_pb2.LENGTH
    assert [r async for r in queued][-1].finish_reason == common_pb2.LENGTH


def _queued(router: RouterServer) -> int:
    return int(router.metrics.registry.get_sample_value("manylora:num_requests_waiting") or 0)


async def test_deadline_reaches_the_worker_and_ends_the_call(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    worker.gate = asyncio.Event()  # never opened: only the deadline ends the stream
    stub = channel_to(await start_router_for([worker]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    remaining = worker.seen[0].time_remaining
    assert remaining is not None and 0 < remaining < 0.6  # gRPC rounds the deadline
    await until(lambda: worker.seen[0].cancelled and worker.open_streams == 0)


async def test_deadline_passing_in_the_router_queue(start_fakes, start_router_for, channel_to):
    (worker,) = await start_fakes(1)
    worker.gate = asyncio.Event()
    router = await start_router_for([worker], max_running=1, max_queued=4)
    stub = channel_to(router)
    running = stub.Generate(request(), timeout=10)
    await running.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request(), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: _queued(router) == 0)
    assert len(worker.seen) == 1  # the queued one never reached the worker
    worker.gate.set()
    await drain(running)


async def test_client_that_goes_away_cancels_the_worker_request(
    start_fakes, start_router_for, channel_to
):
    (worker,) = await start_fakes(1)
    worker.gate = asyncio.Event()
    router = await start_router_for([worker])
    stub = channel_to(router)
    call = stub.Generate(request(), timeout=10)
    await call.read()
    call.cancel()
    await until(lambda: worker.seen[0].cancelled and worker.open_streams == 0)
    assert not worker.seen[0].finished
    await until(lambda: router.pool.eligible()[0].in_flight == 0)
    assert router.metrics.registry.get_sample_value("manylora:num_requests_running") == 0


async def test_resident_adapter_goes_to_its_worker_until_the_load_bound(
    start_fakes, start_router_for, channel_to
):
    a, b = await start_fakes(2)
    a.resident = ["hot"]
    for fake in (a, b):
        fake.gate = asyncio.Event()  # every stream stays open: loads only grow
    # Polls far apart: the load the router sees is its own count of open streams.
    router = await start_router_for([a, b], health_interval_s=30, load_bound=1.25, min_load_bound=4)
    stub = channel_to(router)
    calls, placed = [], []
    for i in range(12):
        call = stub.Generate(request("hot", request_id=f"r{i}"), timeout=10)
        placed.append((await call.read()).text[0])
        calls.append(call)
    # a holds the adapter: it takes them up to max(4, ceil(1.25 * n / 2)) at each step.
    assert placed[:4] == ["a"] * 4
    assert placed[4] == "b"  # 5th: a is at max(4, ceil(1.25 * 5 / 2)) = 4
    for n in range(1, 13):
        assert placed[:n].count("a") <= max(4, -(-5 * n // 8))
    assert placed.count("a") > placed.count("b") > 0
    for fake in (a, b):
        assert fake.gate is not None
        fake.gate.set()
    for call in calls:
        await drain(call)


@pytest.mark.parametrize("backlog_on", ["a", "b"])
async def test_requests_waiting_in_a_worker_queue_count_as_its_load(
    start_fakes, start_router_for, channel_to, backlog_on
):
    a, b = await start_fakes(2)
    a.resident = ["hot"]
    # A queue of 6 that other routers left there: nothing runs, so only the waiting count
    # shows it. The bound is ceil(1.25 * (6 + 1) / 2) = 5, which the backlog is over.
    {"a": a, "b": b}[backlog_on].waiting = 6
    router = await start_router_for([a, b], health_interval_s=30, load_bound=1.25, min_load_bound=1)
    stub = channel_to(router)
    responses = await collect(stub, request("hot", request_id="r0"))
    # Affinity gives way to the backlog on a; a backlog on b leaves affinity as it was.
    assert responses[0].text[0] == ("b" if backlog_on == "a" else "a")
