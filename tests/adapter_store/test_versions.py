"""Versions, listing, deletion and restarts, against the disk tier alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from tests.adapter_store.helpers import (
    aio_channel,
    as_stream,
    make_peft_adapter,
    read_adapter,
    store_config,
    upload_requests,
)

Stub = adapter_store_pb2_grpc.AdapterStoreStub


async def _upload(stub: Stub, adapter_id: str, folder: Path) -> common_pb2.AdapterInfo:
    config_json, weights = read_adapter(folder)
    return await stub.UploadAdapter(as_stream(upload_requests(adapter_id, config_json, weights)))


async def _fetch(
    stub: Stub, adapter_id: str, version: int = 0
) -> tuple[common_pb2.AdapterInfo, bytes]:
    request = adapter_store_pb2.FetchAdapterRequest(adapter_id=adapter_id, version=version)
    chunks = [chunk async for chunk in stub.FetchAdapter(request)]
    return chunks[0].info, b"".join(chunk.data for chunk in chunks)


async def _status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code()


async def test_reupload_makes_version_2_and_version_0_means_newest(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    other = tmp_path / "other"
    make_peft_adapter(other, seed=9)
    server = await start_store(store_config(tmp_path / "data"))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        first = await _upload(stub, "a", qv_adapter)
        second = await _upload(stub, "a", other)
        newest_info = await stub.GetAdapterInfo(
            adapter_store_pb2.GetAdapterInfoRequest(adapter_id="a")
        )
        v1_info = await stub.GetAdapterInfo(
            adapter_store_pb2.GetAdapterInfoRequest(adapter_id="a", version=1)
        )
        newest, newest_blob = await _fetch(stub, "a")
        old, old_blob = await _fetch(stub, "a", version=1)
        missing = await _status_of(
            stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="a", version=3))
        )

    assert (first.version, second.version) == (1, 2)
    assert first.sha256 != second.sha256
    assert newest_info == second and v1_info == first
    assert newest == second and hashlib.sha256(newest_blob).hexdigest() == second.sha256
    assert old == first and hashlib.sha256(old_blob).hexdigest() == first.sha256
    assert missing == grpc.StatusCode.NOT_FOUND


async def test_fetch_streams_several_chunks_with_the_info_on_the_first_only(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    server = await start_store(store_config(tmp_path / "data", fetch_chunk_bytes=8192))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        info = await _upload(stub, "a", qv_adapter)
        request = adapter_store_pb2.FetchAdapterRequest(adapter_id="a")
        chunks = [chunk async for chunk in stub.FetchAdapter(request)]

    assert len(chunks) == -(-info.size_bytes // 8192) > 1
    assert all(len(chunk.data) <= 8192 for chunk in chunks)
    assert chunks[0].info == info
    assert not any(chunk.HasField("info") for chunk in chunks[1:])


async def test_list_adapters_pages_by_id_with_the_newest_version(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    server = await start_store(store_config(tmp_path / "data"))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        for adapter_id in ["e", "a", "c", "b", "d", "a"]:
            await _upload(stub, adapter_id, qv_adapter)
        pages, token = [], ""
        while True:
            page = await stub.ListAdapters(
                common_pb2.ListAdaptersRequest(page_size=2, page_token=token)
            )
            pages.append([(info.adapter_id, info.version) for info in page.adapters])
            token = page.next_page_token
            if not token:
                break

    assert pages == [[("a", 2), ("b", 1)], [("c", 1), ("d", 1)], [("e", 1)]]


async def test_delete_removes_every_version_and_unknown_ids_are_not_found(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    data_dir = tmp_path / "data"
    server = await start_store(store_config(data_dir))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        await _upload(stub, "gone", qv_adapter)
        await _upload(stub, "gone", qv_adapter)
        await _upload(stub, "kept", qv_adapter)
        deleted = await stub.DeleteAdapter(
            adapter_store_pb2.DeleteAdapterRequest(adapter_id="gone")
        )
        codes = [
            await _status_of(
                stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="gone"))
            ),
            await _status_of(_fetch(stub, "gone")),
            await _status_of(
                stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id="gone"))
            ),
            await _status_of(_fetch(stub, "never-was")),
        ]
        listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest())

    assert deleted.deleted_versions == 2
    assert codes == [grpc.StatusCode.NOT_FOUND] * 4
    assert [info.adapter_id for info in listed.adapters] == ["kept"]
    assert sorted(p.name for p in (data_dir / "gone").iterdir()) == ["last_version"]


async def test_restart_reads_disk_cleans_temp_and_never_reuses_a_version(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    data_dir = tmp_path / "data"
    server = await start_store(store_config(data_dir))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        await _upload(stub, "a", qv_adapter)
        second = await _upload(stub, "a", qv_adapter)
        await _upload(stub, "b", qv_adapter)
        await stub.DeleteAdapter(adapter_store_pb2.DeleteAdapterRequest(adapter_id="b"))
    await server.stop()
    crashed = data_dir / ".tmp" / "write-crashed"  # what a crash mid-upload leaves
    crashed.mkdir()
    (crashed / "weights.safetensors").write_bytes(b"half")
    (data_dir / "not an id!" / "v1").mkdir(parents=True)  # stray folder, ignored

    server = await start_store(store_config(data_dir))
    async with aio_channel(server.port) as channel:
        stub = Stub(channel)
        info = await stub.GetAdapterInfo(adapter_store_pb2.GetAdapterInfoRequest(adapter_id="a"))
        listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest())
        reborn = await _upload(stub, "b", qv_adapter)

    assert info == second
    assert [i.adapter_id for i in listed.adapters] == ["a"]
    assert list((data_dir / ".tmp").iterdir()) == []
    assert reborn.version == 2
