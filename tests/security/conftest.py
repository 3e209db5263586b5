"""Keys, tokens of every kind, and a whole stack (store, CPU worker, router) that requires
tokens, for the security tests."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from manylora.v1 import adapter_store_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from services.common.random_adapters import save_random_peft_adapter
from services.common.tokens import ADAPTERS_WRITE, GENERATE, SERVICE, SigningKeys
from tests.adapter_store.helpers import aio_channel, as_stream, upload_requests
from tests.e2e.conftest import stack
from tests.e2e.stack import Stack


@dataclass(frozen=True)
class Tokens:
    generate: str
    write: str
    service: str
    expired: str  # scope generate and adapters:write, expired an hour ago
    forged: str  # scope generate, signed with a key the services do not hold


__all__ = ["stack"]  # the e2e stack fixture, stopped at the end of each test


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.key"
    path.write_text(secrets.token_urlsafe(48) + "\n")
    return path


@pytest.fixture
def tokens(key_file: Path) -> Tokens:
    keys = SigningKeys.from_file(key_file)
    other = SigningKeys([secrets.token_urlsafe(48).encode()])
    hour = 3600.0
    return Tokens(
        generate=keys.mint("alice", [GENERATE], hour),
        write=keys.mint("ops", [ADAPTERS_WRITE], hour),
        service=keys.mint("svc", [SERVICE], hour),
        expired=keys.mint("old", [GENERATE, ADAPTERS_WRITE], hour, now=time.time() - 2 * hour),
        forged=other.mint("mallory", [GENERATE, ADAPTERS_WRITE, SERVICE], hour),
    )


async def upload_with(stack: Stack, token: str, adapter_id: str, folder: Path) -> None:
    assert stack.store is not None
    async with aio_channel(stack.store.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        requests = upload_requests(
            adapter_id, (folder / CONFIG_FILE).read_text(), (folder / WEIGHTS_FILE).read_bytes()
        )
        await stub.UploadAdapter(as_stream(requests), metadata=bearer(token), timeout=30)


def random_adapter(folder: Path, seed: int = 1) -> Path:
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    return save_random_peft_adapter(folder, shape, 8, seed=seed)


@pytest.fixture
async def secured(stack: Stack, tmp_path: Path, key_file: Path, tokens: Tokens) -> Stack:
    return await start_secured(stack, tmp_path, key_file, tokens)


async def start_secured(stack: Stack, tmp_path: Path, key_file: Path, tokens: Tokens) -> Stack:
    """Store, one CPU worker and a router, all requiring tokens; adapter "ad" uploaded."""
    await stack.start_store(auth_key_file=str(key_file))
    await upload_with(stack, tokens.write, "ad", random_adapter(tmp_path / "ad"))
    await stack.start_worker(auth_key_file=str(key_file))
    await stack.start_router(auth_key_file=str(key_file))
    return stack
