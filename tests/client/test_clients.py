"""The Python clients and the command line against a router with fake workers."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.client import AsyncManyloraClient, ManyloraClient, ManyloraError
from services.client.__main__ import main as cli_main
from tests.router.fakes import FakeStore, serve_fake_store


async def until(predicate, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def stack(start_fakes, start_router_for):
    """One fake worker behind a router with a fake store that knows adapter `ad`."""
    (worker,) = await start_fakes(1)
    store = FakeStore(known={"ad"})
    store_server = await serve_fake_store(store)
    router = await start_router_for([worker], adapter_store=f"127.0.0.1:{store_server.port}")
    yield worker, f"127.0.0.1:{router.port}"
    await store_server.stop(None)


async def test_async_client_streams_and_completes(stack):
    worker, target = stack
    async with AsyncManyloraClient(target, timeout=10) as client:
        chunks = [c async for c in client.generate("hi", adapter="ad", max_new_tokens=3)]
        assert [c.text for c in chunks] == ["a0 ", "a1 ", "a2 "]
        assert [c.finish_reason for c in chunks] == [None, None, "length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        completion = await client.complete([5, 6, 7], max_new_tokens=3, seed=9, request_id="q")
        assert completion.text == "a0 a1 a2 "
        assert completion.token_ids == [10, 11, 12]
        assert (completion.request_id, completion.finish_reason) == ("q", "length")
        sent = worker.seen[-1].request
        assert list(sent.prompt_token_ids.ids) == [5, 6, 7] and sent.params.seed == 9
        assert [a.adapter_id for a in await client.list_adapters()] == ["ad"]


async def test_async_client_errors_carry_the_status(stack):
    _, target = stack
    async with AsyncManyloraClient(target, timeout=10) as client:
        with pytest.raises(ManyloraError) as err:
            await client.complete("hi", adapter="missing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert not err.value.retryable
    assert "missing" in err.value.details


async def test_async_client_leaving_early_cancels_the_request(stack):
    worker, target = stack
    worker.gate = asyncio.Event()
    async with AsyncManyloraClient(target, timeout=10) as client:
        stream = client.generate("hi", max_new_tokens=3)
        first = await anext(stream)
        assert first.text == "a0 "
        await stream.aclose()
        await until(lambda: worker.seen[0].cancelled)


async def test_sync_client_streams_completes_lists_and_cancels(stack):
    worker, target = stack

    def use_client() -> tuple[list[str], str, list[str]]:
        with ManyloraClient(target, timeout=10) as client:
            texts = [c.text for c in client.generate("hi", adapter="ad", max_new_tokens=3)]
            whole = client.complete("hi", max_new_tokens=3).text
            listed = [a.adapter_id for a in client.list_adapters()]
            worker.gate = asyncio.Event()
            for _ in client.generate("hi", max_new_tokens=3):
                break  # the generator is dropped here, which cancels the call
        return texts, whole, listed

    texts, whole, listed = await asyncio.to_thread(use_client)
    assert texts == ["a0 ", "a1 ", "a2 "]
    assert whole == "a0 a1 a2 "
    assert listed == ["ad"]
    await until(lambda: worker.seen[-1].cancelled)


async def test_sync_client_errors_carry_the_status(stack):
    _, target = stack

    def fail() -> None:
        with ManyloraClient(target, timeout=10) as client:
            client.complete("hi", max_new_tokens=0)

    with pytest.raises(ManyloraError) as err:
        await asyncio.to_thread(fail)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_command_line_streams_to_stdout(stack, capsys):
    worker, target = stack
    argv = ["hello", "--adapter", "ad", "--target", target, "--max-new-tokens", "3"]
    assert await asyncio.to_thread(cli_main, argv) == 0
    out, err = capsys.readouterr()
    assert out == "a0 a1 a2 \n"
    assert "finish length" in err and "3 generated tokens" in err
    assert worker.seen[-1].request.prompt == "hello"
    assert worker.seen[-1].request.params.max_new_tokens == 3


async def test_adapter_versions_go_out_and_come_back(stack, capsys):
    worker, target = stack
    async with AsyncManyloraClient(target, timeout=10) as client:
        chunks = [c async for c in client.generate("hi", adapter="ad", adapter_version=1)]
        assert {c.adapter_version for c in chunks} == {1}
        done = await client.complete("hi", adapter="ad@1", max_new_tokens=3)
        assert done.adapter_version == 1
        assert (await client.complete("hi", max_new_tokens=3)).adapter_version == 0
    assert worker.seen[0].request.adapter_version == 1
    argv = ["hello", "--adapter", "ad", "--adapter-version", "1", "--target", target]
    assert await asyncio.to_thread(cli_main, argv) == 0
    assert worker.seen[-1].request.adapter_version == 1
    assert "(adapter v1)" in capsys.readouterr().err


async def test_command_line_reports_errors_with_exit_status_1(stack, capsys):
    _, target = stack
    argv = ["hello", "--adapter", "missing", "--target", target]
    assert await asyncio.to_thread(cli_main, argv) == 1
    assert "error: NOT_FOUND" in capsys.readouterr().err
