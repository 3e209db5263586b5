"""Scale-out on the CPU: two router processes sharing one Redis registry in front of four
worker processes (the dummy tiny model), several clients streaming through both routers.
Mid-load one worker is killed (SIGKILL), another drained (SIGTERM) and a new one added.

Nothing may be lost: every request ends with the HF + PEFT oracle's greedy tokens, either at
once or after a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED) that the client retries;
no stream hangs (every attempt has a deadline, the whole test a bound). The routers'
adapter-affinity hit rate (`manylora:router_routed_requests_total` by affinity) is printed
and checked against a sanity bound."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.base_model import DUMMY_PRESETS
from tests.adapter_store.helpers import RedisProcess
from tests.e2e.stack import Stack
from tests.e2e.stack import stack_at as e2e_stack_at
from tests.oracle import AdapterSpec, build_pair, greedy_oracle, make_peft_adapters
from tests.processes import ServiceProcess

NEW_TOKENS = 8
CLIENTS = 8
ATTEMPT_TIMEOUT_S = 30.0  # a stream slower than this has hung
MAX_ATTEMPTS = 4
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Twelve adapters, and workers that can keep only a few: a worker's memory pool holds the KV
# of its requests and about six adapters (56 slots each), its host cache four. Routed by
# affinity, each adapter goes to one worker, which keeps it (hits nearly always); routed
# without regard to it, every worker sees every adapter and evicts them in turn, and about
# half the requests find theirs (measured: 0.88 to 0.95; 0.60 with affinity planted out).
SPECS = tuple(AdapterSpec(f"so-{i}", 8, 16, ("q_proj", "v_proj")) for i in range(12))
MIN_HIT_RATE = 0.8
POOL_SLOTS = 600
HOST_CACHE_BYTES = 250_000
WORKER_FLAGS = ["--device", "cpu", "--model", "tiny", "--log-level", "WARNING"]
WORKER_FLAGS += ["--pool-slots", str(POOL_SLOTS), "--host-cache-bytes", str(HOST_CACHE_BYTES)]
# A SIGKILLed worker is noticed by the routers' failed calls and polls at once; its
# registration then expires. A TTL of a few beats keeps a busy box's late beats harmless.
WORKER_FLAGS += ["--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "3"]
# The drain the test was written for: short streams finish well within it, and the drained
# worker exits well within the test's 30 s wait even on two loaded cores.
WORKER_FLAGS += ["--drain-timeout-s", "5"]
# Start-up of six Python processes (torch in five) on two cores that other jobs share.
START_TIMEOUT_S = 240
ROUTER_FLAGS = ["--health-interval-s", "0.2", "--health-timeout-s", "2", "--log-level", "WARNING"]
# Eight clients never put more than eight requests on one worker: under this floor of the
# load bound a worker keeps all its adapters' requests, so the hit rate measures affinity
# alone, not spills to other workers that this box's uneven speed would cause.
ROUTER_FLAGS += ["--min-load-bound", str(CLIENTS)]


@dataclass(frozen=True)
class Kind:
    """One (adapter, prompt) pair and the oracle's greedy tokens for it."""

    adapter: str  # "" = the base model
    prompt: tuple[int, ...]
    expected: tuple[int, ...]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], list[Kind]]:
    """PEFT folders of the adapters and the requests' kinds: two prompts per adapter and two
    for the base model, each with the HF + PEFT oracle's tokens."""
    _, hf = build_pair(DUMMY_PRESETS["tiny"], seed=0)  # the workers' dummy "tiny", seed 0
    peft_model, folders = make_peft_adapters(hf, SPECS, tmp_path_factory.mktemp("peft"))
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 259, (5 + i,), generator=gen).tolist() for i in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: one thread is faster on a busy box
    try:
        found = []
        for adapter in ["", *(spec.name for spec in SPECS)]:
            for prompt in prompts:
                tokens, _ = greedy_oracle(peft_model, prompt, adapter or None, NEW_TOKENS)
                found.append(Kind(adapter, tuple(prompt), tuple(tokens)))
    finally:
        torch.set_num_threads(threads)
    base = {k.prompt: k.expected for k in found if not k.adapter}
    # Adapters strong enough that a request served with the wrong one (or none) shows.
    assert all(k.expected != base[k.prompt] for k in found if k.adapter)
    return folders, found


@dataclass
class Tally:
    """What the clients saw."""

    completed: int = 0
    retried: Counter[str] = field(default_factory=Counter)  # code name -> attempts retried
    wrong: list[str] = field(default_factory=list)  # completions that differ from the oracle
    fatal: list[str] = field(default_factory=list)  # non-retryable errors, or out of attempts
    retry_details: list[str] = field(default_factory=list)


def request_of(kind: Kind) -> common_pb2.GenerateRequest:
    request = common_pb2.GenerateRequest(
        adapter_id=kind.adapter,
        params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    )
    request.prompt_token_ids.ids.extend(kind.prompt)
    return request


async def one_request(
    stubs: list[router_pb2_grpc.RouterStub], first: int, kind: Kind, tally: Tally
) -> None:
    """Send `kind` through the routers in turn until it completes; record what happened."""
    for attempt in range(MAX_ATTEMPTS):
        stub = stubs[(first + attempt) % len(stubs)]
        tokens: list[int] = []
        last = None
        try:
            async for response in stub.Generate(request_of(kind), timeout=ATTEMPT_TIMEOUT_S):
                tokens.extend(response.token_ids)
                last = response
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                tally.fatal.append(f"{kind.adapter!r}: {exc.code().name}: {exc.details()}")
                return
            tally.retried[exc.code().name] += 1
            tally.retry_details.append(exc.details() or "")
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        assert last is not None
        if last.finish_reason != common_pb2.LENGTH or tuple(tokens) != kind.expected:
            tally.wrong.append(f"{kind.adapter!r} {kind.prompt}: got {tokens}")
        tally.completed += 1
        return
    tally.fatal.append(f"{kind.adapter!r}: still failing after {MAX_ATTEMPTS} attempts")


async def client_loop(
    index: int, stubs: list[router_pb2_grpc.RouterStub], kinds: list[Kind], tally: Tally, stop
) -> None:
    for n in itertools.count():
        if stop.is_set():
            return
        kind = kinds[(index * 7 + n * 3) % len(kinds)]
        await one_request(stubs, index + n, kind, tally)


async def until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await predicate():
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if wanted <= set(k))


@contextlib.contextmanager
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


# The e2e fixtures' stack (an async generator), as a context manager.
stack_at = contextlib.asynccontextmanager(e2e_stack_at)


async def test_two_routers_four_workers_kill_drain_and_add_lose_nothing(
    tmp_path: Path, kinds: tuple[dict[str, Path], list[Kind]]
):
    folders, all_kinds = kinds
    began = time.monotonic()
    redis = RedisProcess(tmp_path)
    redis.start()
    try:
        async with stack_at(tmp_path) as stack, asyncio.timeout(START_TIMEOUT_S + 180):
            with processes() as started:
                await scenario(tmp_path, stack, folders, all_kinds, redis.url, started, began)
    finally:
        redis.kill()


async def scenario(
    tmp: Path,
    stack: Stack,
    folders: dict[str, Path],
    kinds: list[Kind],
    redis_url: str,
    started: list[ServiceProcess],
    began: float,
) -> None:
    await stack.start_store()  # in this process: it is not the store that is under test
    await stack.upload(folders)
    common = ["--adapter-store", stack.store_address, "--registry-redis-url", redis_url]

    def worker(metrics: bool = False) -> ServiceProcess:
        process = ServiceProcess("services.gpu_worker", [*WORKER_FLAGS, *common], tmp, metrics)
        started.append(process)
        return process

    workers = [worker() for _ in range(4)]
    routers = [
        ServiceProcess("services.router", [*ROUTER_FLAGS, *common], tmp, metrics=True)
        for _ in range(2)
    ]
    started.extend(routers)
    await asyncio.gather(*(p.wait_serving(START_TIMEOUT_S) for p in [*workers, *routers]))

    async def healthy_everywhere(count: int) -> bool:
        seen = [await r.metrics() for r in routers]
        return all(total(s, "manylora:router_workers", state="healthy") == count for s in seen)

    await until(lambda: healthy_everywhere(4), 30, "both routers to see the four workers")
    ready = time.monotonic()

    tally = Tally()
    stop = asyncio.Event()
    channels = [grpc.aio.insecure_channel(r.address) for r in routers]
    stubs = [router_pb2_grpc.RouterStub(c) for c in channels]
    clients = [
        asyncio.create_task(client_loop(i, stubs, kinds, tally, stop)) for i in range(CLIENTS)
    ]

    async def completed(n: int) -> bool:
        return tally.completed >= n

    try:
        await until(lambda: completed(24), 60, "24 completions before the faults")
        killed = workers[0]
        killed.signal(signal.SIGKILL)
        added = worker(metrics=True)  # starts while the others serve
        mark = tally.completed
        await until(lambda: completed(mark + 16), 60, "16 completions after the kill")
        drained = workers[1]
        drained.signal(signal.SIGTERM)
        assert await drained.wait_exit(30) == 0, f"the drained worker failed: {drained.log}"
        await added.wait_serving(START_TIMEOUT_S)
        await until(lambda: healthy_everywhere(3), 30, "both routers to see 2 old + 1 new")

        async def added_served() -> bool:
            return total(await added.metrics(), "manylora:request_success_total") >= 4

        await until(added_served, 60, "the added worker to serve requests", interval_s=0.3)
        mark = tally.completed
        await until(lambda: completed(mark + 24), 60, "24 completions on the new set")
    finally:
        stop.set()
        await asyncio.gather(*clients)
        for channel in channels:
            await channel.close()

    router_samples = [await r.metrics() for r in routers]
    routed = {
        affinity: sum(
            total(s, "manylora:router_routed_requests_total", affinity=affinity)
            for s in router_samples
        )
        for affinity in ("gpu", "host", "none", "base")
    }
    with_adapter = routed["gpu"] + routed["host"] + routed["none"]
    hit_rate = (routed["gpu"] + routed["host"]) / with_adapter
    drained_failures = [d for d in tally.retry_details if drained.address in d]
    print(
        f"\nscale-out: {tally.completed} requests completed by {CLIENTS} clients through 2 "
        f"routers; retried {dict(tally.retried)} ({len(drained_failures)} naming the drained "
        f"worker); routed {routed}; adapter-affinity hit rate {hit_rate:.2f}; "
        f"start-up {ready - began:.1f} s, load {time.monotonic() - ready:.1f} s"
    )
    assert not tally.fatal, tally.fatal[:5]
    assert not tally.wrong, f"{len(tally.wrong)} differ from the oracle: {tally.wrong[:3]}"
    assert hit_rate >= MIN_HIT_RATE, routed
    # SIGTERM drains: the worker leaves the registry, refuses new calls (which the routers
    # retry elsewhere before any token) and finishes the streams it has.
    assert not drained_failures, drained_failures[:3]
