"""Streams under stress: an upload cut off halfway, and many concurrent fetches of one adapter."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save as st_save

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from tests.adapter_store.helpers import (
    aio_channel,
    as_stream,
    read_adapter,
    store_config,
    upload_requests,
)


async def test_upload_cut_off_halfway_leaves_no_adapter_behind(
    tmp_path: Path, qv_adapter: Path, start_store, redis_proc, redis_client
) -> None:
    data_dir = tmp_path / "data"
    server = await start_store(store_config(data_dir, redis_url=redis_proc.url))
    config_json, weights = read_adapter(qv_adapter)
    messages = upload_requests("cut", config_json, weights, chunk=4096, total_size=len(weights))
    assert len(messages) > 8
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        call = stub.UploadAdapter()
        for message in messages[: len(messages) // 2]:
            await call.write(message)
        await asyncio.sleep(0.2)  # let the server take in what was sent
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.2)
        listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest())
        missing = stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="cut"))
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await missing
        files_after_cut = [p for p in data_dir.rglob("*") if p.name != ".tmp"]
        keys_after_cut = await redis_client.dbsize()
        # The cut-off upload took no version number either.
        whole = await stub.UploadAdapter(as_stream(messages))

    assert list(listed.adapters) == []
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert files_after_cut == []
    assert keys_after_cut == 0
    assert whole.version == 1


async def test_fifty_concurrent_cold_fetches_cost_one_disk_read(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    server = await start_store(store_config(tmp_path / "data", fetch_chunk_bytes=8192))
    config_json, weights = read_adapter(qv_adapter)
    reads, asked = [0], [0]
    all_asked = threading.Event()
    read_blob, store_fetch = server.store.disk.read_blob, server.store.fetch

    async def counting_fetch(adapter_id: str, version: int = 0) -> tuple[Any, bytes]:
        asked[0] += 1
        if asked[0] == 50:
            all_asked.set()
        return await store_fetch(adapter_id, version)

    def slow_counting_read(adapter_id: str, version: int) -> bytes:
        reads[0] += 1
        # A disk that answers only once all fifty requests have asked, however loaded the
        # machine is: a second read can then only come from a second load.
        all_asked.wait(timeout=30)
        return read_blob(adapter_id, version)

    server.store.fetch = counting_fetch
    server.store.disk.read_blob = slow_counting_read
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        info = await stub.UploadAdapter(as_stream(upload_requests("hot", config_json, weights)))

        async def fetch() -> bytes:
            request = adapter_store_pb2.FetchAdapterRequest(adapter_id="hot")
            return b"".join([chunk.data async for chunk in stub.FetchAdapter(request)])

        blobs = await asyncio.gather(*(fetch() for _ in range(50)))

    assert asked[0] == 50
    assert reads[0] == 1
    assert len(set(blobs)) == 1
    assert hashlib.sha256(blobs[0]).hexdigest() == info.sha256


async def test_adapter_larger_than_a_grpc_message_passes_both_ways(
    tmp_path: Path, start_store
) -> None:
    """A Llama-7B-shaped adapter (~8 MB) through a channel with gRPC's default 4 MB limit."""
    hidden, layers = 4096, 32
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, hidden)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, 8)
    weights = bytes(st_save(tensors))
    config_json = '{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    assert len(weights) > 2 * 4 * 1024 * 1024
    server = await start_store(
        store_config(tmp_path / "data", base_model="llama-7b", fetch_chunk_bytes=2 << 20)
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        requests = upload_requests("big", config_json, weights, chunk=1 << 20)
        info = await stub.UploadAdapter(as_stream(requests))
        request = adapter_store_pb2.FetchAdapterRequest(adapter_id="big")
        chunks = [chunk async for chunk in stub.FetchAdapter(request)]

    blob = b"".join(chunk.data for chunk in chunks)
    assert len(chunks) == -(-info.size_bytes // (2 << 20)) >= 4
    assert hashlib.sha256(blob).hexdigest() == info.sha256
