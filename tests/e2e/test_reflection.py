"""gRPC server reflection on every service: the services each one lists, and the descriptors
a tool such as grpcurl needs to call a method without the .proto files; behind a token when
the service requires tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from manylora.v1 import adapter_store_pb2, gpu_worker_pb2, router_pb2
from services.common.tokens import ADAPTERS_WRITE, SigningKeys
from tests.adapter_store.helpers import aio_channel
from tests.e2e.stack import Stack

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def full_name(module, service: str) -> str:
    return str(module.DESCRIPTOR.services_by_name[service].full_name)


async def ask(
    port: int, request: reflection_pb2.ServerReflectionRequest, metadata: tuple = ()
) -> reflection_pb2.ServerReflectionResponse:
    async with aio_channel(port) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for reply in stub.ServerReflectionInfo(iter([request]), metadata=metadata):
            return reply
    raise AssertionError("no reflection reply")


async def listed(port: int, metadata: tuple = ()) -> set[str]:
    reply = await ask(port, reflection_pb2.ServerReflectionRequest(list_services=""), metadata)
    return {s.name for s in reply.list_services_response.service}


async def methods_of(port: int, service: str) -> set[str]:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)
    reply = await ask(port, request)
    names = set()
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for described in proto.service:
            if f"{proto.package}.{described.name}" == service:
                names |= {m.name for m in described.method}
    return names


async def test_every_service_lists_itself_and_describes_its_methods(stack: Stack):
    store = await stack.start_store()
    worker = await stack.start_worker()
    router = await stack.start_router()
    expected = {
        store.port: full_name(adapter_store_pb2, "AdapterStore"),
        worker.port: full_name(gpu_worker_pb2, "GpuWorker"),
        router.port: full_name(router_pb2, "Router"),
    }
    for port, service in expected.items():
        assert await listed(port) == {service, HEALTH, REFLECTION}
    assert await methods_of(router.port, expected[router.port]) == {"Generate", "ListAdapters"}
    store_methods = {"UploadAdapter", "GetAdapterInfo", "FetchAdapter", "ListAdapters"}
    assert await methods_of(store.port, expected[store.port]) == store_methods | {"DeleteAdapter"}


async def test_reflection_needs_a_token_where_tokens_are_required(stack: Stack, tmp_path: Path):
    key_file = tmp_path / "auth.key"
    key_file.write_text("r" * 40)
    store = await stack.start_store(auth_key_file=str(key_file))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed(store.port)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = SigningKeys.from_file(key_file).mint("ops", [ADAPTERS_WRITE], 60)
    services = await listed(store.port, (("authorization", f"Bearer {token}"),))
    assert full_name(adapter_store_pb2, "AdapterStore") in services
