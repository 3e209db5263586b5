"""Build a worker from its config and serve it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from manylora.v1 import gpu_worker_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.grpc_server import RunningServer, start_server, wait_for_signal_then
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
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model, load_hf_model
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.heartbeat import start_heartbeat
from services.gpu_worker.serving.metrics import serve_worker_metrics
from services.gpu_worker.serving.servicer import GpuWorkerServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = "manylora.v1.GpuWorker"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(config: WorkerConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype {config.dtype!r} not one of {', '.join(_DTYPES)}, auto")
    return device, _DTYPES[config.dtype]


def build_engine(config: WorkerConfig) -> tuple[Engine, Tokenizer]:
    device, dtype = resolve_device(config)
    model_config = ModelConfig.from_hf(load_hf_config(config.model))
    if config.dummy:
        model = build_dummy_model(
            model_config, config.seed, dtype, device, draw_on_device=device.type == "cuda"
        )
        tokenizer: Tokenizer = ByteTokenizer(model_config.vocab_size)
    else:
        model = load_hf_model(config.model, model_config, dtype, device)
        tokenizer = HFTokenizer(config.model)
    logger.info("model %s on %s in %s (dummy=%s)", config.model, device, dtype, config.dummy)
    slots = pool_slots(config, model_config, dtype, device)
    engine = Engine(
        model,
        pool_slots=slots,
        max_num_seqs=config.max_num_seqs,
        max_prefill_tokens=config.max_prefill_tokens,
        max_waiting=config.max_waiting,
        max_model_len=config.max_model_len or None,
        unified_pool=config.unified_pool,
        max_rank=config.max_rank,
        max_loras=config.max_loras,
        lora_backend=config.lora_backend,
        adapter_region_slots=0
        if config.unified_pool
        else int(slots * config.adapter_region_fraction),
    )
    logger.info("memory pool: %d slots (unified=%s)", slots, config.unified_pool)
    if device.type == "cuda" and config.cuda_graphs:
        engine.capture_decode_graphs()
    return engine, tokenizer


def pool_slots(
    config: WorkerConfig, model_config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    if config.pool_slots:
        return config.pool_slots
    width = model_config.num_kv_heads * model_config.head_dim
    return UnifiedMemoryPool.default_slots(
        model_config.num_layers, width, dtype, device, config.gpu_memory_fraction
    )


def build_adapter_source(config: WorkerConfig, shape: BaseModelShape) -> AdapterSource:
    if config.adapter_store and config.adapters:
        raise ValueError("give --adapter-store or --adapters, not both")
    if config.adapter_store:
        return StoreAdapterSource(
            config.adapter_store,
            config.host_cache_bytes,
            version_ttl_s=config.adapter_version_ttl_s,
            security=config.channel_security("gpu_worker"),
        )
    return LocalFolderAdapterSource(parse_adapter_paths(config.adapters), shape, config.max_rank)


@dataclass
class Worker:
    server: RunningServer
    loop: EngineLoop
    # Heartbeat and metrics endpoint, stopped first: routers stop sending work before we go.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        for close in self.closers:
            await close()
        await self.server.set_serving([SERVICE_NAME], False)
        await self.server.stop()
        self.loop.stop()


async def start_worker(config: WorkerConfig) -> Worker:
    engine, tokenizer = build_engine(config)
    adapters = build_adapter_source(config, engine.config.shape)
    loop = EngineLoop(engine)
    loop.start()
    servicer = GpuWorkerServicer(loop, tokenizer, adapters, config.model)
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
    )
    closers: list[Callable[[], Awaitable[None]]] = []
    worker = Worker(server, loop, closers)
    try:  # a later start-up failure (a taken metrics port) stops what already runs
        heartbeat = await start_heartbeat(config, server.port, servicer.stats)
        if heartbeat is not None:
            closers.append(heartbeat.stop)
        if config.metrics_port:
            metrics = servicer.metrics
            closers.append(
                await serve_worker_metrics(
                    metrics, config.metrics_port, config.host, servicer.stats
                )
            )
        if isinstance(adapters, StoreAdapterSource):
            if config.adapter_events_redis_url:
                listener = AdapterEventListener(
                    adapters, config.adapter_events_redis_url, config.adapter_events_channel
                )
                listener.start()
                closers.append(listener.stop)
            closers.append(adapters.close)
    except BaseException:
        await worker.stop()
        raise
    return worker


async def serve(config: WorkerConfig) -> None:
    worker = await start_worker(config)
    await wait_for_signal_then(worker.stop)
