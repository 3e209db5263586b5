"""No token or key in any log line (text or JSON), in any error a caller gets back, or in the
repr of a service's settings, through accepted and refused calls of the real services."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest

from manylora.v1 import common_pb2, router_pb2_grpc
from services.client import AsyncManyloraClient, ManyloraError
from services.common import channels
from services.common.logging import JsonFormatter, RequestIdFilter, TextFormatter
from services.router.config import RouterConfig
from tests.e2e.stack import Stack
from tests.security.conftest import Tokens, bearer, start_secured


@pytest.fixture
def minted(monkeypatch) -> list[str]:
    """Every service token the services mint for their calls to each other."""
    tokens: list[str] = []
    mint = channels.MintedServiceToken.__call__

    def recording(self: channels.MintedServiceToken) -> str:
        token = mint(self)
        tokens.append(token)
        return token

    monkeypatch.setattr(channels.MintedServiceToken, "__call__", recording)
    return tokens


async def test_tokens_and_keys_never_reach_logs_or_errors(
    minted: list[str],
    stack: Stack,
    tmp_path: Path,
    key_file: Path,
    tokens: Tokens,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
):
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RequestIdFilter())
    await start_secured(stack, tmp_path, key_file, tokens)
    router = f"127.0.0.1:{stack.routers[0].port}"
    errors: list[str] = []
    async with AsyncManyloraClient(router, timeout=30, token=tokens.generate) as client:
        await client.complete("hi", adapter="ad", max_new_tokens=2)
    for token in (tokens.write, tokens.expired, tokens.forged, tokens.generate[:-3] + "abc"):
        async with AsyncManyloraClient(router, timeout=30, token=token) as client:
            with pytest.raises(ManyloraError) as caught:
                await client.complete("hi", adapter="ad", max_new_tokens=2)
            errors.append(str(caught.value))
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as rpc_error:
            await stub.ListAdapters(
                common_pb2.ListAdaptersRequest(), metadata=bearer(f"x{tokens.generate}")
            )
        errors.append(str(rpc_error.value))

    secrets = [key_file.read_text().strip(), *minted]
    for token in (tokens.generate, tokens.write, tokens.expired, tokens.forged, tokens.service):
        secrets += [token, token.split(".")[2]]  # the signature alone too
    assert minted, "the services minted no token: the check below would prove nothing"
    text, as_json = TextFormatter(), JsonFormatter()
    lines = [f(r) for r in caplog.records for f in (text.format, as_json.format)]
    assert any("refused /manylora.v1.Router/Generate" in line for line in lines)
    assert all(isinstance(json.loads(as_json.format(r)), dict) for r in caplog.records)
    captured = capfd.readouterr()
    everything = "\n".join([*lines, *errors, captured.out, captured.err])
    for secret in secrets:
        assert secret not in everything


def test_settings_show_paths_not_secrets(key_file: Path, tokens: Tokens, tmp_path: Path):
    token_file = tmp_path / "service.token"
    token_file.write_text(tokens.service)
    config = RouterConfig(
        workers=["127.0.0.1:1"], auth_key_file=str(key_file), service_token_file=str(token_file)
    )
    config.check()
    shown = repr(config) + repr(config.channel_security("router"))
    assert str(key_file) in shown
    assert key_file.read_text().strip() not in shown and tokens.service not in shown
