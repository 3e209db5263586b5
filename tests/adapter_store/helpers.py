"""Helpers shared by the adapter-store tests and the worker's store-source tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from services.adapter_store.config import AdapterStoreConfig
from services.common.base_model import DUMMY_PRESETS
from services.common.grpc_server import SERVER_OPTIONS, free_port
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """The "tiny" dummy preset the store validates against by default."""
    return LlamaConfig(**{**DUMMY_PRESETS["tiny"], **overrides})


def make_peft_adapter(
    folder: Path, seed: int = 0, llama: LlamaConfig | None = None, **lora: Any
) -> PeftModel:
    """Save a real PEFT LoRA adapter (random non-zero A and B) to `folder`; the PEFT model."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama or tiny_llama_config())
    options = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **options))
    model.save_pretrained(str(folder))
    return model


def read_adapter(folder: Path) -> tuple[str, bytes]:
    return (folder / CONFIG_FILE).read_text(), (folder / WEIGHTS_FILE).read_bytes()


def upload_requests(
    adapter_id: str, config_json: str, weights: bytes, chunk: int = 16 << 10, total_size: int = 0
) -> list[adapter_store_pb2.UploadAdapterRequest]:
    header = adapter_store_pb2.UploadHeader(
        adapter_id=adapter_id, adapter_config_json=config_json, total_size=total_size
    )
    messages = [adapter_store_pb2.UploadAdapterRequest(header=header)]
    for offset in range(0, len(weights), chunk):
        piece = weights[offset : offset + chunk]
        messages.append(adapter_store_pb2.UploadAdapterRequest(chunk=piece))
    return messages


def upload_status(port: int, requests: list[Any]) -> tuple[grpc.StatusCode, str]:
    """UploadAdapter through grpc's synchronous client, in the calling thread: the status and
    details the store answered. grpc's asyncio client can report INTERNAL ("Internal error
    from Core") instead of the store's status when the store refuses an upload before the
    client's last write (a grpcio client behaviour, seen once in a CI run), so tests that
    check a refusal's status send it through this."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=SERVER_OPTIONS) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        try:
            stub.UploadAdapter(iter(requests))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def as_stream(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def store_config(data_dir: Path, **overrides: Any) -> AdapterStoreConfig:
    fields: dict[str, Any] = {
        "port": free_port(),
        "data_dir": str(data_dir),
        "fetch_chunk_bytes": 64 << 10,  # several chunks even for tiny adapters
        "redis_retry_s": 0.1,
        **overrides,
    }
    return AdapterStoreConfig(**fields)


def aio_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=SERVER_OPTIONS)


class RedisProcess:
    """A private redis-server on a free port, without persistence."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if os.environ.get("MANYLORA_NO_REDIS_SERVER") == "1":  # .ci/device: the device has none
            pytest.skip("needs redis-server, which this machine lacks (MANYLORA_NO_REDIS_SERVER)")
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


async def upload_code(
    sync_stub: adapter_store_pb2_grpc.AdapterStoreStub,
    messages: list[adapter_store_pb2.UploadAdapterRequest],
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    """The status code of an upload (OK included) and its message. Sent with the sync API in
    a thread: when a server refuses a stream the client is still writing, the asyncio API
    may report INTERNAL instead of the server's status (grpc/grpc#36066)."""

    def call() -> tuple[grpc.StatusCode, str]:
        try:
            sync_stub.UploadAdapter(iter(messages), metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    return await asyncio.to_thread(call)


async def cancelled_upload(
    sync_stub: adapter_store_pb2_grpc.AdapterStoreStub,
    messages: list[adapter_store_pb2.UploadAdapterRequest],
) -> None:
    """Send `messages` as an upload that never ends, then cancel it, through the sync API in
    a thread (grpc/grpc#36066, as in `upload_code`): the asyncio API's writes may fail with
    INTERNAL when a cancel races them."""

    def call() -> None:
        sent, release = threading.Event(), threading.Event()

        def stream() -> Iterator[adapter_store_pb2.UploadAdapterRequest]:
            yield from messages
            sent.set()
            release.wait(30)  # the stream stays open, unfinished, until cancelled

        future = sync_stub.UploadAdapter.future(stream(), timeout=60)
        try:
            assert sent.wait(30), "the upload's messages were never all taken"
            future.cancel()
        finally:
            release.set()

    await asyncio.to_thread(call)
