"""Bearer-token authentication through the real services (store, CPU worker, router): every
kind of call refused without a good token and the right scope, nothing changed by a refused
call, and clients with good tokens streaming meanwhile."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manylora.v1 import (
    adapter_store_pb2,
    adapter_store_pb2_grpc,
    common_pb2,
    gpu_worker_pb2,
    gpu_worker_pb2_grpc,
    router_pb2_grpc,
)
from services.client import AsyncManyloraClient, ManyloraError
from services.common.auth import METHOD_SCOPES, AuthInterceptor
from services.common.tokens import SigningKeys
from tests.adapter_store.helpers import aio_channel, upload_code, upload_requests
from tests.e2e.stack import Stack
from tests.security.conftest import Tokens, bearer, random_adapter, upload_with

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def refusals(tokens: Tokens, scope_holder: str, wrong_scope: str) -> list[tuple[tuple, object]]:
    """(metadata, the code it must get) for one method; `scope_holder` has the needed scope."""
    return [
        ((), UNAUTH),
        ((("authorization", "Bearer"),), UNAUTH),
        ((("authorization", "Bearer not-a-token"),), UNAUTH),
        ((("authorization", f"Basic {scope_holder}"),), UNAUTH),
        ((*bearer(scope_holder), *bearer(scope_holder)), UNAUTH),  # two headers
        (bearer(tokens.expired), UNAUTH),
        (bearer(tokens.forged), UNAUTH),
        (bearer(scope_holder[:-4] + "AAAA"), UNAUTH),  # signature changed
        (bearer(wrong_scope), DENIED),
    ]


def generate_request(max_new_tokens: int = 4) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        prompt="hello",
        adapter_id="ad",
        params=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


async def stream_code(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def unary_code(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_router_refuses_bad_tokens_while_good_clients_stream(secured: Stack, tokens: Tokens):
    router = f"127.0.0.1:{secured.routers[0].port}"
    async with (
        AsyncManyloraClient(router, timeout=60, token=tokens.generate) as good,
        grpc.aio.insecure_channel(router) as channel,
    ):
        streams = [
            good.generate("hello", adapter="ad", max_new_tokens=48, ignore_eos=True)
            for _ in range(2)
        ]
        firsts = [await anext(s) for s in streams]  # both streams open and flowing
        stub = router_pb2_grpc.RouterStub(channel)
        for metadata, code in refusals(tokens, tokens.generate, tokens.write):
            got = await stream_code(stub.Generate(generate_request(), metadata=metadata))
            assert got == code, metadata
            listing = stub.ListAdapters(common_pb2.ListAdaptersRequest(), metadata=metadata)
            assert await unary_code(listing) == code, metadata
        # A service token is for services, not for the public front.
        assert (
            await stream_code(stub.Generate(generate_request(), metadata=bearer(tokens.service)))
            == DENIED
        )
        for first, stream in zip(firsts, streams, strict=True):
            rest = [chunk async for chunk in stream]
            tokens_out = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
            assert tokens_out == 48 and rest[-1].finish_reason == "length"
        listed = await good.list_adapters()
        assert [a.adapter_id for a in listed] == ["ad"]
        with pytest.raises(ManyloraError) as caught:
            await AsyncManyloraClient(router, token=tokens.expired).complete("hi", adapter="ad")
        assert caught.value.code == UNAUTH and "expired" in caught.value.details


async def test_refused_uploads_and_deletes_change_nothing(
    secured: Stack, tokens: Tokens, tmp_path: Path
):
    assert secured.store is not None
    data_dir = tmp_path / "store"
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    folder = random_adapter(tmp_path / "evil", seed=7)
    config_json, weights = (
        (folder / "adapter_config.json").read_text(),
        (folder / "adapter_model.safetensors").read_bytes(),
    )
    with grpc.insecure_channel(f"127.0.0.1:{secured.store.port}") as sync_channel:
        sync_store = adapter_store_pb2_grpc.AdapterStoreStub(sync_channel)
        async with aio_channel(secured.store.port) as channel:
            store = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            for metadata, code in refusals(tokens, tokens.write, tokens.generate):
                for adapter_id in ("ad", "new-one"):  # a new version, and a new id
                    requests = upload_requests(adapter_id, config_json, weights)
                    got, _ = await upload_code(sync_store, requests, metadata)
                    assert got == code, metadata
                delete = store.DeleteAdapter(
                    adapter_store_pb2.DeleteAdapterRequest(adapter_id="ad"), metadata=metadata
                )
                assert await unary_code(delete) == code, metadata
            # Adapter weights are for services and operators, not for clients that generate.
            fetch = store.FetchAdapter(
                adapter_store_pb2.FetchAdapterRequest(adapter_id="ad"),
                metadata=bearer(tokens.generate),
            )
            assert await stream_code(fetch) == DENIED
            assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
            info = await store.GetAdapterInfo(
                adapter_store_pb2.GetAdapterInfoRequest(adapter_id="ad"),
                metadata=bearer(tokens.generate),
            )
            assert info.version == 1
            listed = await store.ListAdapters(
                common_pb2.ListAdaptersRequest(), metadata=bearer(tokens.write)
            )
            assert [a.adapter_id for a in listed.adapters] == ["ad"]

            router = f"127.0.0.1:{secured.routers[0].port}"
            async with AsyncManyloraClient(router, timeout=60, token=tokens.generate) as client:
                done = await client.complete("hi", adapter="ad", max_new_tokens=3, ignore_eos=True)
                assert done.adapter_version == 1 and len(done.token_ids) == 3

                # The right scope is let through: the checks refuse by scope, not everything.
                await upload_with(secured, tokens.write, "ad", folder)
                info = await store.GetAdapterInfo(
                    adapter_store_pb2.GetAdapterInfoRequest(adapter_id="ad"),
                    metadata=bearer(tokens.service),
                )
                assert info.version == 2
                reply = await store.DeleteAdapter(
                    adapter_store_pb2.DeleteAdapterRequest(adapter_id="ad"),
                    metadata=bearer(tokens.write),
                )
                assert reply.deleted_versions == 2


async def test_workers_serve_only_the_service_scope_and_health_is_open(
    secured: Stack, tokens: Tokens
):
    worker = secured.workers[0]
    async with aio_channel(worker.port) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        for metadata, code in refusals(tokens, tokens.service, tokens.generate):
            assert await stream_code(stub.Generate(generate_request(), metadata=metadata)) == code
            stats = stub.GetStats(gpu_worker_pb2.GetStatsRequest(), metadata=metadata)
            assert await unary_code(stats) == code
        call = stub.Generate(generate_request(3), metadata=bearer(tokens.service))
        assert [len(r.token_ids) async for r in call][-1] >= 1
    assert secured.store is not None
    for port in (worker.port, secured.routers[0].port, secured.store.port):
        async with aio_channel(port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_rpc_of_the_contract_has_its_scopes():
    """A new RPC without a line in METHOD_SCOPES would be refused to everyone; this names it."""
    from manylora.v1 import adapter_store_pb2, gpu_worker_pb2, router_pb2

    paths = {
        f"/{service.full_name}/{method.name}"
        for module in (adapter_store_pb2, gpu_worker_pb2, router_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert paths == set(METHOD_SCOPES)
    assert all(METHOD_SCOPES[p] for p in paths)


def test_a_method_missing_from_the_table_is_refused_to_every_token():
    keys = SigningKeys([b"k" * 40])
    interceptor = AuthInterceptor(keys, method_scopes={})
    token = keys.mint("root", ["generate", "adapters:write", "service"], 60)
    with pytest.raises(Exception, match="needs scope a method known"):
        interceptor.check("/manylora.v1.Router/Generate", bearer(token))
