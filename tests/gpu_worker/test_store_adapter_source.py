"""The worker's StoreAdapterSource: host LRU by bytes, sha256 checks, errors, shared fetches."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from redis.asyncio import Redis

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from services.adapter_store.server import StoreServer, start_store_server
from services.common.adapter_events import DELETE, UPLOAD, AdapterEvent
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.errors import NotFound, Unavailable
from services.common.grpc_server import RunningServer, free_port, start_server
from services.common.lora_format import AdapterKey, CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.adapters.host_adapter_cache import HostAdapterCache, adapter_nbytes
from services.gpu_worker.adapters.store_adapter_source import (
    AdapterEventListener,
    StoreAdapterSource,
)
from tests.adapter_store.helpers import (
    RedisProcess,
    aio_channel,
    as_stream,
    make_peft_adapter,
    read_adapter,
    store_config,
    upload_requests,
)

TINY = BaseModelShape.from_hf_config(load_hf_config("tiny"))


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worker-adapters") / "qv"
    make_peft_adapter(folder, seed=11)
    return folder


@pytest.fixture
async def store(tmp_path: Path, adapter_folder: Path) -> AsyncIterator[StoreServer]:
    """A disk-only store holding the same adapter under the ids a, b and c."""
    server = await start_store_server(store_config(tmp_path / "data"))
    config_json, weights = read_adapter(adapter_folder)
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        for adapter_id in "abc":
            requests = upload_requests(adapter_id, config_json, weights)
            await stub.UploadAdapter(as_stream(requests))
    yield server
    await server.stop(grace=None)


class FakeStore(adapter_store_pb2_grpc.AdapterStoreServicer):
    """Serves one good blob, damaged on the first `corrupt` fetches and on every fetch of the
    ids in `corrupt_ids`; counts fetches."""

    def __init__(
        self,
        blob: bytes,
        corrupt: int,
        delay_s: float = 0.0,
        corrupt_ids: tuple[str, ...] = (),
        delays: dict[str, float] | None = None,
    ):
        self.blob = blob
        self.corrupt = corrupt
        self.delay_s = delay_s
        self.delays = delays or {}  # per id, instead of delay_s
        self.corrupt_ids = corrupt_ids
        self.fetches = 0
        self.asked: list[str] = []  # ids in the order their fetches reached the store
        self.in_flight = self.most_in_flight = 0

    async def FetchAdapter(self, request, context):
        self.fetches += 1
        self.asked.append(request.adapter_id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delays.get(request.adapter_id, self.delay_s))
        finally:
            self.in_flight -= 1
        data = self.blob
        if self.fetches <= self.corrupt or request.adapter_id in self.corrupt_ids:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        info = common_pb2.AdapterInfo(
            adapter_id=request.adapter_id, version=1, sha256=hashlib.sha256(self.blob).hexdigest()
        )
        yield adapter_store_pb2.AdapterChunk(info=info, data=data[:1000])
        yield adapter_store_pb2.AdapterChunk(data=data[1000:])


async def _serve_fake(fake: FakeStore) -> RunningServer:
    def add(server) -> None:
        adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(fake, server)

    return await start_server([add], ["manylora.v1.AdapterStore"], "127.0.0.1", free_port())


def _same(x: CanonicalAdapter, y: CanonicalAdapter) -> bool:
    return x.target_modules == y.target_modules and all(
        torch.equal(x.lora_a[p], y.lora_a[p]) and torch.equal(x.lora_b[p], y.lora_b[p])
        for p in x.target_modules
    )


async def test_host_cache_keeps_within_bytes_and_evicts_least_recently_used(
    store: StoreServer, adapter_folder: Path
) -> None:
    expected = load_peft_folder(adapter_folder, TINY, max_rank=128)
    size = adapter_nbytes(expected)
    source = StoreAdapterSource(f"127.0.0.1:{store.port}", cache_max_bytes=size * 5 // 2)
    try:
        first_a = await source.get("a")
        await source.get("b")
        again_a = await source.get("a")  # a hit: now b is the least recently used
        await source.get("c")
        after_c = source.cached_ids()
        await source.get("b")  # fetched again, pushing out a
        after_b = source.cached_ids()
    finally:
        await source.close()

    assert _same(first_a, expected)
    assert again_a is first_a
    assert after_c == ["a", "c"]
    assert after_b == ["b", "c"]
    assert (source.hits, source.misses) == (1, 4)
    assert source.cache.nbytes == 2 * size


async def test_adapters_are_kept_in_the_engines_dtype_with_their_identity(
    store: StoreServer, adapter_folder: Path
) -> None:
    """The store's fp32 upload kept in bf16: converted once, at fetch, taking half the host
    cache's bytes (two fit in a budget of one and a quarter fp32 ones)."""
    expected = load_peft_folder(adapter_folder, TINY, max_rank=128)
    size = adapter_nbytes(expected)
    as_stored = StoreAdapterSource(f"127.0.0.1:{store.port}", cache_max_bytes=1 << 30)
    source = StoreAdapterSource(
        f"127.0.0.1:{store.port}", cache_max_bytes=size * 5 // 4, dtype=torch.bfloat16
    )
    try:
        stored = await as_stored.get("a")
        kept = [await source.get(i) for i in "abc"]
    finally:
        await source.close()
        await as_stored.close()
    assert stored.dtype_name == "float32"
    assert kept[0].key == stored.key  # the identity of the blob the store holds
    for proj in expected.target_modules:
        for got, want in ((kept[0].lora_a, expected.lora_a), (kept[0].lora_b, expected.lora_b)):
            assert got[proj].dtype == torch.bfloat16
            assert torch.equal(got[proj], want[proj].to(torch.bfloat16))
    assert source.cached_ids() == ["b", "c"]  # 2 of half the size fit in 5/4 of one
    assert source.cache.nbytes == size


def test_host_cache_skips_an_adapter_larger_than_its_budget(adapter_folder: Path) -> None:
    adapter = load_peft_folder(adapter_folder, TINY, max_rank=128)
    cache = HostAdapterCache(max_bytes=adapter_nbytes(adapter) - 1)
    key = AdapterKey("big", 1, "00")
    assert cache.put(key, adapter) == []
    assert cache.get(key) is None and cache.nbytes == 0


async def test_unknown_id_is_not_found_and_a_dead_store_unavailable(store: StoreServer) -> None:
    source = StoreAdapterSource(f"127.0.0.1:{store.port}", cache_max_bytes=1 << 30)
    dead = StoreAdapterSource(f"127.0.0.1:{free_port()}", cache_max_bytes=1 << 30, timeout_s=5)
    try:
        with pytest.raises(NotFound, match="nope"):
            await source.get("nope")
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            await dead.get("a")
    finally:
        await source.close()
        await dead.close()
    assert source.cached_ids() == [] and source.misses == 1


async def test_corrupted_blob_is_retried_once_then_unavailable(adapter_folder: Path) -> None:
    blob = load_peft_folder(adapter_folder, TINY, max_rank=128, adapter_id="x").to_bytes()
    once, always = FakeStore(blob, corrupt=1), FakeStore(blob, corrupt=100)
    servers = [await _serve_fake(once), await _serve_fake(always)]
    recovering = StoreAdapterSource(f"127.0.0.1:{servers[0].port}", cache_max_bytes=1 << 30)
    failing = StoreAdapterSource(f"127.0.0.1:{servers[1].port}", cache_max_bytes=1 << 30)
    try:
        recovered = await recovering.get("x")
        with pytest.raises(Unavailable, match="sha256"):
            await failing.get("x")
    finally:
        for source in (recovering, failing):
            await source.close()
        for server in servers:
            await server.stop(None)

    assert _same(recovered, CanonicalAdapter.from_bytes(blob))
    assert once.fetches == 2 and recovering.cached_ids() == ["x"]
    assert always.fetches == 2 and failing.cached_ids() == []


async def test_concurrent_gets_of_one_id_share_one_fetch(adapter_folder: Path) -> None:
    blob = load_peft_folder(adapter_folder, TINY, max_rank=128, adapter_id="x").to_bytes()
    fake = FakeStore(blob, corrupt=0, delay_s=0.3)
    server = await _serve_fake(fake)
    source = StoreAdapterSource(f"127.0.0.1:{server.port}", cache_max_bytes=1 << 30)
    try:
        adapters = await asyncio.gather(*(source.get("x") for _ in range(20)))
    finally:
        await source.close()
        await server.stop(None)
    assert fake.fetches == 1
    assert all(adapter is adapters[0] for adapter in adapters)


async def test_a_burst_of_first_gets_downloads_two_at_a_time_in_the_order_asked(
    adapter_folder: Path,
) -> None:
    """A cold worker's burst: at most `max_concurrent_fetches` downloads at once, first asked
    first fetched, and a failed one gives its place up (the first id's two attempts both
    fail their sha256 check here)."""
    blob = load_peft_folder(adapter_folder, TINY, max_rank=128, adapter_id="x").to_bytes()
    fake = FakeStore(blob, corrupt=0, delay_s=0.05, corrupt_ids=("id-0",))
    server = await _serve_fake(fake)
    source = StoreAdapterSource(
        f"127.0.0.1:{server.port}", cache_max_bytes=1 << 30, max_concurrent_fetches=2
    )
    ids = [f"id-{i}" for i in range(8)]
    try:
        got = await asyncio.gather(*(source.get(i) for i in ids), return_exceptions=True)
    finally:
        await source.close()
        await server.stop(None)
    assert isinstance(got[0], Unavailable)
    expected = CanonicalAdapter.from_bytes(blob)
    assert all(isinstance(a, CanonicalAdapter) and _same(a, expected) for a in got[1:])
    assert fake.most_in_flight == 2
    first = fake.asked.index("id-1")  # the failing id's retry may come before or after it
    assert [i for i in fake.asked if i != "id-0"] == ids[1:] and first <= 2
    assert source.cached_ids() == ids[1:]


async def test_a_slow_download_does_not_hold_the_others_back(adapter_folder: Path) -> None:
    """One place for downloads, taken first by an adapter the store takes 3 s to send: past
    `slow_fetch_s` it gives the place up, and the four behind it arrive long before it."""
    blob = load_peft_folder(adapter_folder, TINY, max_rank=128, adapter_id="x").to_bytes()
    fake = FakeStore(blob, corrupt=0, delay_s=0.02, delays={"huge": 3.0})
    server = await _serve_fake(fake)
    source = StoreAdapterSource(
        f"127.0.0.1:{server.port}",
        cache_max_bytes=1 << 30,
        max_concurrent_fetches=1,
        slow_fetch_s=0.2,
    )
    finished: list[str] = []

    async def get(adapter_id: str) -> None:
        await source.get(adapter_id)
        finished.append(adapter_id)

    try:
        huge = asyncio.create_task(get("huge"))
        await asyncio.sleep(0.05)  # it has the place
        await asyncio.gather(huge, *(get(f"small-{i}") for i in range(4)))
    finally:
        await source.close()
        await server.stop(None)
    assert finished == [f"small-{i}" for i in range(4)] + ["huge"]
    assert fake.most_in_flight == 2  # the huge one and one small one at a time


# --- versions ------------------------------------------------------------------------------


async def _upload(server: StoreServer, adapter_id: str, folder: Path) -> None:
    config_json, weights = read_adapter(folder)
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        await stub.UploadAdapter(as_stream(upload_requests(adapter_id, config_json, weights)))


@pytest.fixture(scope="module")
def second_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worker-adapters-2") / "qv2"
    make_peft_adapter(folder, seed=12)
    return folder


async def test_a_new_version_is_served_once_the_ttl_has_passed(
    store: StoreServer, adapter_folder: Path, second_folder: Path
) -> None:
    source = StoreAdapterSource(f"127.0.0.1:{store.port}", 1 << 30, version_ttl_s=0.0)
    try:
        v1 = await source.get("a")
        await _upload(store, "a", second_folder)
        v2 = await source.get("a")  # resolution expired at once: asks again, fetches v2
        pinned = await source.get("a", 1)
        with pytest.raises(NotFound, match="version 7"):
            await source.get("a", 7)
    finally:
        await source.close()
    assert (v1.version, v2.version, pinned.version) == (1, 2, 1)
    assert v1.sha256 != v2.sha256 and pinned.key == v1.key
    assert _same(v1, load_peft_folder(adapter_folder, TINY, 128))
    assert _same(v2, load_peft_folder(second_folder, TINY, 128))
    assert v2.adapter_id == "a"


async def test_a_notice_takes_effect_at_once_and_old_versions_leave_the_host_cache(
    store: StoreServer, second_folder: Path
) -> None:
    source = StoreAdapterSource(f"127.0.0.1:{store.port}", 1 << 30, version_ttl_s=600.0)
    try:
        v1 = await source.get("a")
        await _upload(store, "a", second_folder)
        still = await source.get("a")  # no notice, TTL far away: v1 as before
        source.on_event(AdapterEvent(UPLOAD, "a", 2))
        v2 = await source.get("a")
        cached = [k.version for k in source.cache.list_keys() if k.adapter_id == "a"]
        async with aio_channel(store.port) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            await stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id="a"))
        source.on_event(AdapterEvent(DELETE, "a", 2))
        with pytest.raises(NotFound):
            await source.get("a")
    finally:
        await source.close()
    assert still is v1 and v2.version == 2
    assert cached == [2]
    assert "a" not in source.cached_ids()


async def test_a_notice_during_a_fetch_is_not_undone_by_its_answer(adapter_folder: Path) -> None:
    """The fetch started before the notice may carry the old version: its answer must not be
    remembered as the newest."""
    blob = load_peft_folder(adapter_folder, TINY, max_rank=128, adapter_id="x").to_bytes()
    fake = FakeStore(blob, corrupt=0, delay_s=0.3)
    server = await _serve_fake(fake)
    source = StoreAdapterSource(f"127.0.0.1:{server.port}", 1 << 30, version_ttl_s=600.0)
    try:
        pending = asyncio.ensure_future(source.get("x"))
        await asyncio.sleep(0.1)
        source.on_event(AdapterEvent(UPLOAD, "x", 2))
        await pending
        await source.get("x")  # must ask the store again
    finally:
        await source.close()
        await server.stop(None)
    assert fake.fetches == 2


async def test_an_unreachable_store_leaves_the_last_resolved_version_serving(
    store: StoreServer,
) -> None:
    source = StoreAdapterSource(f"127.0.0.1:{store.port}", 1 << 30, version_ttl_s=0.0, timeout_s=2)
    try:
        before = await source.get("a")
        await store.stop(grace=None)
        after = await source.get("a")  # the TTL has passed, but the store cannot be asked
        with pytest.raises(Unavailable):
            await source.get("b")  # never fetched: nothing to fall back on
    finally:
        await source.close()
    assert after is before


class _Recording(StoreAdapterSource):
    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", 1 << 20)
        self.events: list[AdapterEvent] = []

    def on_event(self, event: AdapterEvent) -> None:
        self.events.append(event)


async def test_the_listener_hands_on_notices_and_comes_back_after_redis_restarts(
    tmp_path: Path,
) -> None:
    redis = RedisProcess(tmp_path)
    redis.start()
    source = _Recording()
    listener = AdapterEventListener(source, redis.url, "chan", retry_s=0.05)
    client = Redis.from_url(redis.url)
    try:
        listener.start()
        await asyncio.wait_for(listener.subscribed.wait(), 5)
        await client.publish("chan", AdapterEvent(UPLOAD, "a", 2).encode())
        await client.publish("chan", b"not a notice")  # logged and ignored
        await client.publish("other", AdapterEvent(UPLOAD, "b", 2).encode())
        redis.kill()
        redis.start()  # same port, empty
        await client.aclose()
        client = Redis.from_url(redis.url)
        # Published until heard: the listener may not have subscribed again yet.
        async with asyncio.timeout(5):
            while len(source.events) < 2:
                await client.publish("chan", AdapterEvent(DELETE, "a", 2).encode())
                await asyncio.sleep(0.05)
    finally:
        await listener.stop()
        await client.aclose()
        redis.kill()
    assert source.events[:2] == [AdapterEvent(UPLOAD, "a", 2), AdapterEvent(DELETE, "a", 2)]
