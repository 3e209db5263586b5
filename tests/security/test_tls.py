"""TLS and mutual TLS through the real services, with certificates made in the test: client ->
router -> worker -> store all encrypted (and, under mutual TLS, each caller presenting its
certificate); callers without TLS, trusting another CA, or without a client certificate
refused at the handshake."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from services.client import AsyncManyloraClient, ClientTls, ManyloraClient, ManyloraError
from services.common.channels import ChannelSecurity, aio_channel
from services.common.config import ConfigError
from services.common.healthcheck import check
from services.common.tokens import SigningKeys
from services.openai_front.config import OpenAIFrontConfig
from tests.adapter_store.helpers import as_stream, upload_requests
from tests.e2e.stack import Stack
from tests.openai_front.conftest import openai_client, start_front
from tests.security.certs import Authority
from tests.security.conftest import random_adapter

HANDSHAKE_REFUSED = grpc.StatusCode.UNAVAILABLE  # gRPC's code for a failed TLS handshake


def tls_settings(ca: Authority, name: str, mutual: bool) -> dict[str, Any]:
    pair = ca.issue(name)
    settings = {"tls_cert_file": pair.cert_file, "tls_key_file": pair.key_file}
    if mutual:
        settings["tls_client_ca_file"] = ca.cert_file
    return settings


async def start_tls_stack(
    stack: Stack, ca: Authority, tmp: Path, mutual: bool, **auth: Any
) -> ChannelSecurity:
    """Store, worker and router over TLS; returns what an operator's client would use."""
    operator = ca.issue("operator")
    operator_tls = ClientTls(ca.cert_file, operator.cert_file, operator.key_file)
    await stack.start_store(**tls_settings(ca, "store", mutual), **auth)
    assert stack.store is not None
    token = auth and SigningKeys.from_file(auth["auth_key_file"]).mint(
        "ops", ["adapters:write"], 60
    )
    security = ChannelSecurity(operator_tls, (lambda: token) if token else None)
    async with aio_channel(f"127.0.0.1:{stack.store.port}", security) as channel:
        folder = random_adapter(tmp / "ad")
        requests = upload_requests(
            "ad",
            (folder / "adapter_config.json").read_text(),
            (folder / "adapter_model.safetensors").read_bytes(),
        )
        await adapter_store_pb2_grpc.AdapterStoreStub(channel).UploadAdapter(
            as_stream(requests), timeout=30
        )
    callee_ca = {"tls_ca_file": ca.cert_file}
    await stack.start_worker(**tls_settings(ca, "worker", mutual), **callee_ca, **auth)
    await stack.start_router(**tls_settings(ca, "router", mutual), **callee_ca, **auth)
    return security


async def refused_code(client: AsyncManyloraClient) -> grpc.StatusCode:
    with pytest.raises(ManyloraError) as caught:
        await client.complete("hi", adapter="ad", max_new_tokens=2)
    return caught.value.code


async def test_tls_round_trip_and_callers_without_tls_refused(stack: Stack, tmp_path: Path):
    ca, rogue = Authority.create(tmp_path, "test"), Authority.create(tmp_path, "rogue")
    await start_tls_stack(stack, ca, tmp_path, mutual=False)
    router = f"127.0.0.1:{stack.routers[0].port}"
    async with AsyncManyloraClient(router, timeout=60, tls=ClientTls(ca.cert_file)) as client:
        done = await client.complete("hi", adapter="ad", max_new_tokens=4, ignore_eos=True)
        assert len(done.token_ids) == 4 and done.adapter_version == 1

    def sync_call(target: str) -> int:
        with ManyloraClient(target, timeout=60, tls=ClientTls(ca.cert_file)) as sync:
            return len(sync.complete("hi", max_new_tokens=3, ignore_eos=True).token_ids)

    assert await asyncio.to_thread(sync_call, router) == 3
    async with AsyncManyloraClient(router, timeout=10) as plaintext:
        assert await refused_code(plaintext) == HANDSHAKE_REFUSED
    rogue_tls = ClientTls(rogue.cert_file)
    async with AsyncManyloraClient(router, timeout=10, tls=rogue_tls) as wrong_ca:
        assert await refused_code(wrong_ca) == HANDSHAKE_REFUSED
    serving, _ = await asyncio.to_thread(
        check, router, "", 5.0, ChannelSecurity(ClientTls(ca.cert_file))
    )
    assert serving
    serving, message = await asyncio.to_thread(check, router, "", 5.0)
    assert not serving and "UNAVAILABLE" in message


async def test_mutual_tls_with_tokens_refuses_clients_without_a_certificate(
    stack: Stack, tmp_path: Path, key_file: Path
):
    ca, rogue = Authority.create(tmp_path, "test"), Authority.create(tmp_path, "rogue")
    keys = SigningKeys.from_file(key_file)
    token = keys.mint("alice", ["generate"], 60)
    await start_tls_stack(stack, ca, tmp_path, mutual=True, auth_key_file=str(key_file))
    router = f"127.0.0.1:{stack.routers[0].port}"
    alice = ca.issue("alice")
    good_tls = ClientTls(ca.cert_file, alice.cert_file, alice.key_file)
    async with AsyncManyloraClient(router, timeout=60, tls=good_tls, token=token) as client:
        done = await client.complete("hi", adapter="ad", max_new_tokens=4, ignore_eos=True)
        assert len(done.token_ids) == 4 and done.adapter_version == 1
    no_cert = ClientTls(ca.cert_file)
    async with AsyncManyloraClient(router, timeout=10, tls=no_cert, token=token) as client:
        assert await refused_code(client) == HANDSHAKE_REFUSED
    mallory = rogue.issue("mallory")
    rogue_cert = ClientTls(ca.cert_file, mallory.cert_file, mallory.key_file)
    async with AsyncManyloraClient(router, timeout=10, tls=rogue_cert, token=token) as client:
        assert await refused_code(client) == HANDSHAKE_REFUSED
    # A good certificate is not a token: mutual TLS and tokens are checked both.
    async with AsyncManyloraClient(router, timeout=10, tls=good_tls) as client:
        assert await refused_code(client) == grpc.StatusCode.UNAUTHENTICATED
    # The store under mutual TLS: a caller without a certificate gets nothing.
    assert stack.store is not None
    store = f"127.0.0.1:{stack.store.port}"
    security = ChannelSecurity(no_cert, lambda: keys.mint("svc", ["service"], 60))
    async with aio_channel(store, security) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetAdapterInfo(
                adapter_store_pb2.GetAdapterInfoRequest(adapter_id="ad"), timeout=10
            )
        assert caught.value.code() == HANDSHAKE_REFUSED


async def test_openai_front_reaches_a_mutual_tls_router(stack: Stack, tmp_path: Path):
    """The front calls the router over mutual TLS when given the CA and its own certificate;
    without TLS, or without a certificate the router trusts, its calls fail (503), and nothing
    reaches the router."""
    ca, rogue = Authority.create(tmp_path, "test"), Authority.create(tmp_path, "rogue")
    await start_tls_stack(stack, ca, tmp_path, mutual=True)
    router_port = stack.routers[0].port
    front_pair, rogue_pair = ca.issue("front"), rogue.issue("front")
    good = {
        "tls_ca_file": ca.cert_file,
        "tls_cert_file": front_pair.cert_file,
        "tls_key_file": front_pair.key_file,
    }
    bad_fronts = [
        {},  # plaintext to a TLS router
        {"tls_ca_file": ca.cert_file},  # TLS, but no client certificate under mutual TLS
        {**good, "tls_cert_file": rogue_pair.cert_file, "tls_key_file": rogue_pair.key_file},
    ]
    for settings in [good, *bad_fronts]:
        front = await start_front(router_port, **settings)
        try:
            client = openai_client(front)
            if settings is good:
                answer = await client.completions.create(
                    model="ad", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True}
                )
                assert answer.usage is not None and answer.usage.completion_tokens == 3
            else:
                with pytest.raises(openai.InternalServerError) as caught:
                    await client.completions.create(model="ad", prompt="hi", max_tokens=3)
                assert caught.value.status_code == 503
        finally:
            await front.stop()
    with pytest.raises(ConfigError, match="--tls-ca-file"):
        OpenAIFrontConfig(tls_ca_file=str(tmp_path / "missing.pem")).check()
    with pytest.raises(ConfigError, match="--tls-key-file"):
        OpenAIFrontConfig(tls_ca_file=ca.cert_file, tls_cert_file=front_pair.cert_file).check()
