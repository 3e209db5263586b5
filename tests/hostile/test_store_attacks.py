"""The adapter store under attack, over its public gRPC API, as a real process with its own
redis-server: huge, lying, malformed, concurrent, cancelled and abandoned uploads; hostile ids;
Redis dying; the store killed mid-upload; a second store on its port. Every attack is checked
to leave nothing behind and to leave other clients' uploads and fetches unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from services.adapter_store.server import REDIS_HEALTH_NAME, SERVICE_NAME
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.grpc_server import SERVER_OPTIONS, free_port
from services.common.lora_format import CanonicalAdapter
from services.common.random_adapters import save_random_peft_adapter
from tests.adapter_store.helpers import (
    RedisProcess,
    cancelled_upload,
    read_adapter,
    upload_code,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
MAX_UPLOAD = 24 * MIB
IN_FLIGHT = 32 * MIB
IDLE_TIMEOUT_S = 1.5
PROBE_S = 0.2
# The Redis health must follow Redis within this, without traffic: a few probe periods and the
# probe's own timeout (1 s), with slack for a loaded CI machine.
HEALTH_BOUND_S = 4.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Request = adapter_store_pb2.UploadAdapterRequest


class StoreProcess:
    """`python -m services.adapter_store` on a free port, with small limits."""

    def __init__(self, data_dir: Path, redis_url: str, port: int | None = None):
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "services.adapter_store",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--redis-url",
            self.redis_url,
            "--redis-retry-s",
            str(PROBE_S),
            "--max-upload-bytes",
            str(MAX_UPLOAD),
            "--max-upload-bytes-in-flight",
            str(IN_FLIGHT),
            "--upload-idle-timeout-s",
            str(IDLE_TIMEOUT_S),
            "--fetch-chunk-bytes",
            str(MIB),
            "--log-level",
            "WARNING",
        ]

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
        self.process = subprocess.Popen(self.argv(), cwd=REPO, env=env)
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError("the store did not start") from None
                    time.sleep(0.1)

    def rss_bytes(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisProcess
) -> Iterator[StoreProcess]:
    server = StoreProcess(tmp_path_factory.mktemp("store") / "data", redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """A real PEFT adapter for the store's base model ("tiny"): config JSON and weights."""
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    folder = save_random_peft_adapter(tmp_path_factory.mktemp("peft") / "a", shape, 8, seed=3)
    return read_adapter(folder)


@pytest.fixture
async def stub(store: StoreProcess) -> AsyncIterator[adapter_store_pb2_grpc.AdapterStoreStub]:
    async with grpc.aio.insecure_channel(store.target, options=SERVER_OPTIONS) as channel:
        yield adapter_store_pb2_grpc.AdapterStoreStub(channel)


@pytest.fixture(scope="module")
def sync_stub(store: StoreProcess) -> Iterator[adapter_store_pb2_grpc.AdapterStoreStub]:
    with grpc.insecure_channel(store.target, options=SERVER_OPTIONS) as channel:
        yield adapter_store_pb2_grpc.AdapterStoreStub(channel)


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def header(adapter_id: str, config_json: str = "{}", total_size: int = 0) -> Request:
    return Request(
        header=adapter_store_pb2.UploadHeader(
            adapter_id=adapter_id, adapter_config_json=config_json, total_size=total_size
        )
    )


def chunks(data: bytes, size: int = MIB) -> list[Request]:
    return [Request(chunk=data[i : i + size]) for i in range(0, len(data), size)]


async def stream(messages: list[Request]) -> AsyncIterator[Request]:
    for message in messages:
        yield message


async def upload_real(stub, adapter_id: str, files: tuple[str, bytes]) -> common_pb2.AdapterInfo:
    config_json, weights = files
    messages = [header(adapter_id, config_json, len(weights)), *chunks(weights, 64 << 10)]
    info: common_pb2.AdapterInfo = await stub.UploadAdapter(stream(messages), timeout=30)
    return info


async def fetch_blob(stub, adapter_id: str) -> tuple[common_pb2.AdapterInfo, bytes]:
    request = adapter_store_pb2.FetchAdapterRequest(adapter_id=adapter_id)
    info, data = None, bytearray()
    async for chunk in stub.FetchAdapter(request, timeout=30):
        if chunk.HasField("info"):
            info = chunk.info
        data += chunk.data
    assert info is not None
    return info, bytes(data)


def same_tensors(blob: bytes, other: bytes) -> bool:
    one, two = CanonicalAdapter.from_bytes(blob), CanonicalAdapter.from_bytes(other)
    return one.lora_a.keys() == two.lora_a.keys() and all(
        torch.equal(one.lora_a[p], two.lora_a[p]) and torch.equal(one.lora_b[p], two.lora_b[p])
        for p in one.lora_a
    )


def spool_files(store: StoreProcess) -> list[Path]:
    return sorted((store.data_dir / ".tmp").iterdir())


async def wait_until_no_spool(store: StoreProcess, within_s: float = 5.0) -> list[Path]:
    deadline = time.monotonic() + within_s
    while (left := spool_files(store)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def wait_for_health(target: str, service: str, status: int, within_s: float) -> float:
    """Seconds until `service` reports `status`; fails past `within_s`."""
    start = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            if reply.status == status:
                return time.monotonic() - start
            if time.monotonic() - start > within_s:
                pytest.fail(f"{service} stayed {reply.status} for {within_s} s, not {status}")
            await asyncio.sleep(0.05)


BAD_IDS = [
    "a\n",
    "a\r\n",
    "\na",
    "a\x00b",
    "a\x00",
    "adapter\u00e9",
    "\u0430dapter",
    "a b",
    "",
    "x" * 10_000,
    "x" * 129,
    "../evil",
    "..",
    ".",
    ".hidden",
    "a/b",
    "a\\b",
    "/abs",
]


async def test_hostile_ids_are_refused_everywhere_and_touch_nothing(
    store: StoreProcess, stub, sync_stub, redis_client, adapter_files: tuple[str, bytes]
) -> None:
    config_json, weights = adapter_files
    before_keys = set(await redis_client.keys("*"))
    before_dirs = sorted(p.name for p in store.data_dir.iterdir())
    good = await upload_real(stub, "ids-good", adapter_files)
    codes = {}
    for bad in BAD_IDS:
        codes[bad] = await upload_code(sync_stub, [header(bad, config_json), *chunks(weights)])
    for bad in ("ids-good\n", "ids-good\x00", "../ids-good", "x" * 10_000):
        for call in (
            stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id=bad)),
            stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id=bad)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fetch_blob(stub, bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
    after_dirs = sorted(p.name for p in store.data_dir.iterdir())
    new_keys = set(await redis_client.keys("*")) - before_keys
    still = await stub.GetAdapterInfo(
        adapter_store_pb2.GetAdapterInfoRequest(adapter_id="ids-good")
    )

    for bad, (code, message) in codes.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad[:20], code, message)
        assert message.startswith("adapter_id: "), message
        assert len(message) < 300, "a 10k-character id is not echoed whole"
    assert after_dirs == sorted([*before_dirs, "ids-good"])
    entries = {key for key in new_keys if key.startswith(b"manylora:store:adapter:")}
    assert entries == {b"manylora:store:adapter:ids-good:v1"}, new_keys
    assert still.sha256 == good.sha256 and still.version == good.version == 1


async def test_malformed_streams_are_refused_and_leave_nothing(
    store: StoreProcess, stub, sync_stub, adapter_files: tuple[str, bytes]
) -> None:
    config_json, weights = adapter_files
    size = len(weights)
    attacks = {
        "empty stream": [],
        "chunk before header": [*chunks(weights), header("mal-1", config_json)],
        "two headers": [header("mal-2", config_json), header("mal-2", config_json)],
        "header again mid-stream": [
            header("mal-3", config_json, size),
            *chunks(weights[:100]),
            header("mal-3"),
        ],
        "total_size bigger than sent": [header("mal-4", config_json, size + 1), *chunks(weights)],
        "total_size smaller than sent": [header("mal-5", config_json, size - 1), *chunks(weights)],
        "header alone": [header("mal-6", config_json)],
        "config of 2 MiB": [header("mal-7", "{" + " " * (2 * MIB) + "}"), *chunks(weights)],
        "garbage weights": [header("mal-8", config_json), Request(chunk=os.urandom(4096))],
    }
    results = {name: await upload_code(sync_stub, messages) for name, messages in attacks.items()}
    listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest(page_size=1000))

    for name, (code, message) in results.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, message)
    assert "total_size" in results["total_size bigger than sent"][1]
    assert "total_size" in results["total_size smaller than sent"][1]
    assert not [info.adapter_id for info in listed.adapters if info.adapter_id.startswith("mal")]
    assert await wait_until_no_spool(store) == []


async def test_huge_uploads_are_refused_while_other_clients_upload_and_fetch_unchanged(
    store: StoreProcess, stub, sync_stub, adapter_files: tuple[str, bytes]
) -> None:
    first = await upload_real(stub, "bystander", adapter_files)
    _, first_blob = await fetch_blob(stub, "bystander")
    huge = b"\x01" * (MAX_UPLOAD + MIB)

    async def announced_huge():  # says so in its header: refused before any byte is sent
        return await upload_code(sync_stub, [header("huge-1", "{}", 1 << 40)])

    async def unannounced_huge():  # says nothing: refused once the cap is passed
        return await upload_code(sync_stub, [header("huge-2", "{}"), *chunks(huge)])

    async def bystander_traffic() -> tuple[list[common_pb2.AdapterInfo], list[bytes]]:
        infos, fetched = [], []
        for _ in range(3):
            infos.append(await upload_real(stub, "bystander", adapter_files))
            fetched.append((await fetch_blob(stub, "bystander"))[1])
        return infos, fetched

    huge_1, huge_2, traffic = await asyncio.gather(
        announced_huge(), unannounced_huge(), bystander_traffic()
    )

    assert huge_1[0] == grpc.StatusCode.INVALID_ARGUMENT and "total_size" in huge_1[1]
    assert huge_2[0] == grpc.StatusCode.INVALID_ARGUMENT and "--max-upload-bytes" in huge_2[1]
    uploads, blobs = traffic
    assert [info.version for info in uploads] == [first.version + 1 + i for i in range(3)]
    # Each fetch got the newest version whole; the same weights as the first. (Blobs are
    # compared by their tensors: safetensors writes its metadata map in a random order.)
    shas = {hashlib.sha256(blob).hexdigest() for blob in blobs}
    assert shas <= {info.sha256 for info in uploads}
    assert all(same_tensors(blob, first_blob) for blob in blobs)
    assert await wait_until_no_spool(store) == []


async def test_concurrent_uploads_over_the_in_flight_bound_are_told_to_retry(
    store: StoreProcess, stub, sync_stub, adapter_files: tuple[str, bytes]
) -> None:
    big = MAX_UPLOAD - MIB  # two of these do not fit in IN_FLIGHT together
    holder = stub.UploadAdapter()
    await holder.write(header("holder", "{}", big))
    await holder.write(Request(chunk=b"\x00" * MIB))
    for _ in range(100):  # until the store has read the header and taken the budget
        if spool_files(store):
            break
        await asyncio.sleep(0.02)

    second = await upload_code(sync_stub, [header("second", "{}", big)])
    unannounced = await upload_code(sync_stub, [header("second-b", "{}"), *chunks(b"\x00" * big)])
    small = await upload_real(stub, "small-fits", adapter_files)  # fits beside the holder
    holder.cancel()
    left = await wait_until_no_spool(store)
    # The cancelled holder gave its budget back: the same big upload is admitted now (and
    # then refused by validation, its bytes being zeros).
    admitted = await upload_code(sync_stub, [header("third", "{}", big), *chunks(b"\x00" * big)])

    assert second[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, second
    assert "--max-upload-bytes-in-flight" in second[1] and "retry" in second[1]
    assert unannounced[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, unannounced
    assert small.version == 1
    assert left == []
    assert admitted[0] == grpc.StatusCode.INVALID_ARGUMENT, admitted


async def test_a_silent_upload_is_dropped_and_gives_its_budget_back(
    store: StoreProcess, stub, sync_stub
) -> None:
    big = MAX_UPLOAD - MIB
    silent = stub.UploadAdapter()
    await silent.write(header("silent", "{}", big))
    await silent.write(Request(chunk=b"\x00" * MIB))
    with pytest.raises(grpc.aio.AioRpcError) as dropped:
        await asyncio.wait_for(silent, timeout=IDLE_TIMEOUT_S + 10)
    admitted = await upload_code(sync_stub, [header("after-silent", "{}", big)])

    assert dropped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--upload-idle-timeout-s" in (dropped.value.details() or "")
    # Admitted (the budget is free again), then refused only because no bytes followed.
    assert admitted[0] == grpc.StatusCode.INVALID_ARGUMENT and "total_size" in admitted[1]
    assert await wait_until_no_spool(store) == []


async def test_cancelled_upload_leaves_nothing_on_disk_or_in_redis(
    store: StoreProcess, stub, redis_client, adapter_files: tuple[str, bytes]
) -> None:
    config_json, weights = adapter_files
    call = stub.UploadAdapter()
    await call.write(header("cancelled", config_json, len(weights)))
    for message in chunks(weights, 4096)[:5]:
        await call.write(message)
    for _ in range(100):
        if spool_files(store):
            break
        await asyncio.sleep(0.02)
    spooled = bool(spool_files(store))
    call.cancel()
    left = await wait_until_no_spool(store)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="cancelled"))
    keys = await redis_client.keys("*cancelled*")
    folder_left = (store.data_dir / "cancelled").exists()
    again = await upload_real(stub, "cancelled", adapter_files)

    assert spooled, "the upload was under way when cancelled"
    assert left == []
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert not folder_left
    assert keys == []
    assert again.version == 1


async def test_memory_returns_to_baseline_after_refused_and_cancelled_uploads(
    store: StoreProcess, stub, sync_stub, adapter_files: tuple[str, bytes]
) -> None:
    """Each round sends 3 × ~20 MiB that is refused (by validation, by the size cap) or
    cancelled. Kept in memory (by the upload, by an exception's frames, by anything), eight
    rounds would add hundreds of MiB; what may remain is the allocator's own slack."""
    garbage = os.urandom(MAX_UPLOAD - 4 * MIB)  # passes the size checks, fails validation
    over_cap = b"\x02" * (MAX_UPLOAD + MIB)

    async def one_round() -> None:
        refused = await upload_code(
            sync_stub, [header("mem-a", "{}", len(garbage)), *chunks(garbage)]
        )
        assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT
        too_big = await upload_code(sync_stub, [header("mem-b", "{}"), *chunks(over_cap)])
        assert too_big[0] == grpc.StatusCode.INVALID_ARGUMENT
        partial = chunks(garbage)[: len(garbage) // MIB - 2]
        await cancelled_upload(sync_stub, [header("mem-c", "{}", len(garbage)), *partial])
        assert await wait_until_no_spool(store) == []

    for _ in range(3):  # warm up: gRPC buffers, thread pool, allocator arenas
        await one_round()
    baseline = store.rss_bytes()
    for _ in range(8):
        await one_round()
    await upload_real(stub, "mem-ok", adapter_files)
    grown = store.rss_bytes() - baseline

    assert grown < 4 * len(garbage), f"the store kept {grown / MIB:.0f} MiB"


async def test_second_server_on_the_port_refuses_to_start_and_steals_no_calls(
    store: StoreProcess, stub, tmp_path: Path, adapter_files: tuple[str, bytes]
) -> None:
    info = await upload_real(stub, "port-owner", adapter_files)
    intruder = StoreProcess(tmp_path / "other-data", store.redis_url, port=store.port)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
    process = subprocess.Popen(
        intruder.argv(), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail("a second store started on a port in use")
    # Every call still reaches the one store that owns the adapter.
    replies = [
        await stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="port-owner"))
        for _ in range(20)
    ]

    assert process.returncode == 2
    assert err.strip().splitlines() == [
        f"python -m services.adapter_store: error: --port (MANYLORA_PORT): cannot listen on "
        f"127.0.0.1:{store.port}: Address already in use"
    ]
    assert {reply.sha256 for reply in replies} == {info.sha256}


async def test_redis_health_follows_redis_without_traffic_and_disk_keeps_serving(
    store: StoreProcess, stub, redis_server: RedisProcess, adapter_files: tuple[str, bytes]
) -> None:
    info = await upload_real(stub, "redis-down", adapter_files)
    await wait_for_health(store.target, REDIS_HEALTH_NAME, SERVING, HEALTH_BOUND_S)
    redis_server.kill()
    try:
        # No store call in between: only the health service is asked.
        await wait_for_health(store.target, REDIS_HEALTH_NAME, NOT_SERVING, HEALTH_BOUND_S)
        await wait_for_health(store.target, SERVICE_NAME, SERVING, within_s=0)  # at once
        fetched_info, blob = await fetch_blob(stub, "redis-down")
        uploaded_meanwhile = await upload_real(stub, "redis-down-2", adapter_files)
    finally:
        redis_server.start()  # same port, empty
    await wait_for_health(store.target, REDIS_HEALTH_NAME, SERVING, HEALTH_BOUND_S)

    assert fetched_info.sha256 == info.sha256 == hashlib.sha256(blob).hexdigest()
    assert uploaded_meanwhile.version == 1


async def test_store_killed_mid_upload_restarts_with_no_half_version(
    store: StoreProcess, redis_client, adapter_files: tuple[str, bytes]
) -> None:
    """Last in this file: it kills the module's store (and starts it again)."""
    config_json, weights = adapter_files
    async with grpc.aio.insecure_channel(store.target, options=SERVER_OPTIONS) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        call = stub.UploadAdapter()
        await call.write(header("killed", config_json, len(weights)))
        for message in chunks(weights, 4096)[:5]:
            await call.write(message)
        for _ in range(100):
            if spool_files(store):
                break
            await asyncio.sleep(0.02)
        spooled = bool(spool_files(store))
        store.stop(signal.SIGKILL)
        call.cancel()
    store.start()  # same port, same data folder
    async with grpc.aio.insecure_channel(store.target, options=SERVER_OPTIONS) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="killed"))
        left = spool_files(store)
        keys = await redis_client.keys("*killed*")
        again = await upload_real(stub, "killed", adapter_files)

    assert spooled, "the upload was under way when the store was killed"
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert left == []
    assert keys == []
    assert again.version == 1
