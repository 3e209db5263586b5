"""Build a worker from its config and serve it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.compile_watch import compile_watch
from manylora.v1 import gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape
from services.common.grpc_server import RunningServer, start_server, wait_for_signal_then
from services.common.thread_profile import ThreadProfile
from services.common.tracing import Tracing, start_tracing
from services.common.validation import add_servicer_leniently
from services.gpu_worker.adapters.adapter_source import (
    AdapterSource,
    LocalFolderAdapterSource,
    parse_adapter_paths,
)
from services.gpu_worker.adapters.store_adapter_source import (
    AdapterEventListener,
    StoreAdapterSource,
)
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.setup import (
    build_engine,
    build_model,
    build_tokenizer,
    resolve_device,
)
from services.gpu_worker.engine.tokenizer import Tokenizer
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.engine_handle import EngineHandle
from services.gpu_worker.serving.engine_process import EngineProcess
from services.gpu_worker.serving.heartbeat import start_heartbeat
from services.gpu_worker.serving.metrics import serve_worker_metrics
from services.gpu_worker.serving.servicer import GpuWorkerServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = "manylora.v1.GpuWorker"


def build_worker_engine(
    config: WorkerConfig, lora_backend: LoraBackend | None = None
) -> tuple[Engine, Tokenizer]:
    """The engine and the tokenizer of `config.model`, where `config` puts them; LoRA through
    `lora_backend` when given (a benchmark's baseline), else the device's."""
    device, dtype = resolve_device(config)
    model, tokenizer = build_model(config.model, config.dummy, config.seed, device, dtype)
    return build_engine(model, config.engine_config(), lora_backend), tokenizer


def build_adapter_source(
    config: WorkerConfig, shape: BaseModelShape, dtype: torch.dtype | None = None
) -> AdapterSource:
    """The worker's adapters: from the store or local folders, kept in `dtype` (the engine's)."""
    if config.adapter_store and config.adapters:
        raise ValueError("give --adapter-store or --adapters, not both")
    if config.adapter_store:
        return StoreAdapterSource(
            config.adapter_store,
            config.host_cache_bytes,
            version_ttl_s=config.adapter_version_ttl_s,
            security=config.channel_security("gpu_worker"),
            dtype=dtype,
            max_concurrent_fetches=config.adapter_fetch_concurrency,
        )
    paths = parse_adapter_paths(config.adapters)
    return LocalFolderAdapterSource(paths, shape, config.max_rank, dtype)


@dataclass
class Worker:
    server: RunningServer
    engine: EngineHandle  # on a thread of this process, or in its own
    # Heartbeat and metrics endpoint, stopped first: routers stop sending work before we go.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    tracing: Tracing | None = None  # stopped last: the spans of drained streams go out too
    drain_timeout_s: float = 2.0  # what running streams get to finish when it stops
    loop_profile: ThreadProfile | None = None  # the event loop's (--profile-to)

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        for close in self.closers:
            await close()
        await self.server.set_serving([SERVICE_NAME], False)
        await self.server.stop(self.drain_timeout_s)
        await _stop_threads_and_tracing(self.engine, self.loop_profile, self.tracing)


async def _stop_threads_and_tracing(
    engine: EngineHandle, loop_profile: ThreadProfile | None, tracing: Tracing | None
) -> None:
    """Stop the engine (its thread or its process) and the event loop's profile (writing it),
    then tracing: what a worker stops last, once nothing is served."""
    engine.stop()
    if loop_profile is not None:
        loop_profile.stop()
    if tracing is not None:
        await tracing.stop()


async def start_worker(config: WorkerConfig, lora_backend: LoraBackend | None = None) -> Worker:
    tracing = start_tracing(config.otel_endpoint, "manylora-gpu-worker")  # before any channel
    engine_profile, loop_profile = thread_profiles(config.profile_to)
    on_failure = NotServingOnFailure(asyncio.get_running_loop())
    engine, tokenizer, adapters = await _start_engine(
        config, lora_backend, engine_profile, on_failure
    )
    if loop_profile is not None:  # this coroutine runs on the event loop's thread
        loop_profile.start()
    try:  # a failure from here on (a taken port) stops the engine and what it started
        servicer = GpuWorkerServicer(
            engine, tokenizer, adapters, config.model, stream_interval=config.stream_interval
        )
        server = await start_server(
            [
                lambda s: add_servicer_leniently(
                    gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server, servicer, s
                )
            ],
            [SERVICE_NAME],
            config.host,
            config.port,
            config,
            tracing,
        )
    except BaseException:
        if isinstance(adapters, StoreAdapterSource):
            await adapters.close()
        await _stop_threads_and_tracing(engine, loop_profile, tracing)
        raise
    closers: list[Callable[[], Awaitable[None]]] = []
    worker = Worker(server, engine, closers, tracing, config.drain_timeout_s, loop_profile)
    on_failure.watch(server)
    try:  # a later start-up failure (a taken metrics port) stops what already runs
        await _start_sidecars(worker, config, servicer, adapters)
    except BaseException:
        await worker.stop()
        raise
    compile_watch().warn = True  # from here on a compilation stalls served requests
    return worker


async def _start_engine(
    config: WorkerConfig,
    lora_backend: LoraBackend | None,
    profile: ThreadProfile | None,
    on_failure: Callable[[str], None],
) -> tuple[EngineHandle, Tokenizer, AdapterSource]:
    """The engine, on a thread of this process or in its own (`--engine-process`; never
    with a benchmark's `lora_backend`, an object of this process), its tokenizer and the
    adapter source, which keeps adapters in the engine's dtype."""
    device, _ = resolve_device(config)
    if lora_backend is None and config.engine_in_process(device.type):
        process = EngineProcess(config, on_failure)
        info = await process.start()
        tokenizer = build_tokenizer(config.model, config.dummy, info.limits.vocab_size)
        dtype = getattr(torch, info.dtype)
        return process, tokenizer, build_adapter_source(config, info.shape, dtype)
    engine, tokenizer = build_worker_engine(config, lora_backend)
    adapters = build_adapter_source(config, engine.model_config.shape, engine.dtype)
    loop = EngineLoop(engine, profile)
    loop.start()
    return loop, tokenizer, adapters


async def _start_sidecars(
    worker: Worker, config: WorkerConfig, servicer: GpuWorkerServicer, adapters: AdapterSource
) -> None:
    """The heartbeat, the metrics endpoint and the adapter-event listener, each registered in
    `worker.closers` as it starts."""
    closers = worker.closers
    heartbeat = await start_heartbeat(config, worker.port, servicer.stats)
    if heartbeat is not None:
        closers.append(heartbeat.stop)
    if config.metrics_port:
        metrics = servicer.metrics
        closers.append(
            await serve_worker_metrics(metrics, config.metrics_port, config.host, servicer.stats)
        )
    if isinstance(adapters, StoreAdapterSource):
        if config.adapter_events_redis_url:
            listener = AdapterEventListener(
                adapters, config.adapter_events_redis_url, config.adapter_events_channel
            )
            listener.start()
            closers.append(listener.stop)
        closers.append(adapters.close)


class NotServingOnFailure:
    """Called from any thread when the engine process dies: the server's health turns
    NOT_SERVING (routers stop sending it work), now or once the server exists."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._server: RunningServer | None = None
        self._failed = False

    def __call__(self, message: str) -> None:
        self._failed = True
        self._loop.call_soon_threadsafe(self._mark)

    def watch(self, server: RunningServer) -> None:
        self._server = server
        if self._failed:
            self._mark()

    def _mark(self) -> None:
        if self._server is not None:
            logger.error("the engine failed: this worker is NOT_SERVING")
            self._loop.create_task(self._server.set_serving([SERVICE_NAME], False))


def thread_profiles(prefix: str) -> tuple[ThreadProfile | None, ThreadProfile | None]:
    """The engine thread's and the event loop's profiles (PREFIX.engine.txt and
    PREFIX.loop.txt), or none without a prefix."""
    if not prefix:
        return None, None
    return ThreadProfile(Path(f"{prefix}.engine.txt")), ThreadProfile(Path(f"{prefix}.loop.txt"))


async def serve(config: WorkerConfig) -> None:
    worker = await start_worker(config)
    await wait_for_signal_then(worker.stop)
