"""The whole stack in this process for a benchmark: adapter store, one worker, a router.

The store (on a temporary folder) is started once and given every adapter of the sweep as a
PEFT upload, through its public UploadAdapter call. Each run then gets a fresh worker (a cold
adapter cache, like a fresh in-process engine) and a router in front of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from benchmarks.serving.engine_setup import EngineVariant
from benchmarks.synthetic_adapters import write_peft_bank
from benchmarks.workload import WorkloadParams, adapter_id
from manylora.v1 import adapter_store_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import StoreServer, start_store_server
from services.common.base_model import TARGET_MODULES, BaseModelShape, load_hf_config
from services.common.grpc_server import SERVER_OPTIONS
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import Worker, start_worker
from services.router.config import RouterConfig
from services.router.server import start_router

UPLOAD_CHUNK_BYTES = 2 << 20
# The router's admission bound must not refuse what an in-process engine would queue.
ROUTER_BOUND = 1 << 20


def _upload_messages(
    adapter: str, folder: Path, weights: bytes
) -> Iterator[adapter_store_pb2.UploadAdapterRequest]:
    header = adapter_store_pb2.UploadHeader(
        adapter_id=adapter,
        adapter_config_json=(folder / CONFIG_FILE).read_text(),
        total_size=len(weights),
    )
    yield adapter_store_pb2.UploadAdapterRequest(header=header)
    for offset in range(0, len(weights), UPLOAD_CHUNK_BYTES):
        chunk = weights[offset : offset + UPLOAD_CHUNK_BYTES]
        yield adapter_store_pb2.UploadAdapterRequest(chunk=chunk)


def bench_adapters(params: WorkloadParams) -> list[tuple[str, int]]:
    """(id, rank) of a trace's adapters, then the warm-up adapters (see warmup_adapters)."""
    named = [(adapter_id(i), params.rank_of(i)) for i in range(params.num_adapters)]
    return named + warmup_adapters(params)


def warmup_adapters(params: WorkloadParams) -> list[tuple[str, int]]:
    """One adapter of each rank that no trace requests: runs warm up on those."""
    return [(f"warmup-r{rank}", rank) for rank in sorted(set(params.ranks))]


def upload_bytes(
    model: str, adapters: list[tuple[str, int]], targets: Sequence[str] = TARGET_MODULES
) -> int:
    """Bytes the store will hold for `adapters`: fp32 A and B of `targets` in every layer."""
    shape = BaseModelShape.from_hf_config(load_hf_config(model))
    per_rank = sum(sum(shape.proj_dims(p)) for p in targets) * shape.num_layers * 4
    return sum(rank * per_rank for _, rank in adapters)


async def upload_adapters(
    store_target: str,
    model: str,
    adapters: list[tuple[str, int]],
    folder: Path,
    distinct: int = 8,
    progress: bool = True,
    targets: Sequence[str] = TARGET_MODULES,
) -> None:
    """Upload each (id, rank) as a copy of one of `distinct` random PEFT folders of its rank
    (see synthetic_adapters), through the store's UploadAdapter call."""
    shape = BaseModelShape.from_hf_config(load_hf_config(model))
    distinct = max(1, min(distinct, len(adapters)))
    ranks = tuple(rank for _, rank in adapters)
    bank = write_peft_bank(folder, shape, ranks, distinct, targets=targets)
    weights = {key: (path / WEIGHTS_FILE).read_bytes() for key, path in bank.items()}
    async with grpc.aio.insecure_channel(store_target, options=SERVER_OPTIONS) as channel:
        stub = AdapterStoreStub(channel)
        for i, (name, rank) in enumerate(
            tqdm(adapters, desc="upload", unit="adapter", disable=not progress)
        ):
            key = (rank, i % distinct)
            await stub.UploadAdapter(_upload_messages(name, bank[key], weights[key]))


@contextlib.asynccontextmanager
async def store_at(folder: Path, model: str, max_rank: int) -> AsyncIterator[StoreServer]:
    config = AdapterStoreConfig(
        port=0, data_dir=str(folder), base_model=model, max_rank=max_rank, log_level="WARNING"
    )
    store = await start_store_server(config)
    try:
        yield store
    finally:
        await store.stop(grace=None)


@dataclass
class ServingStack:
    worker: Worker
    router_target: str


@contextlib.asynccontextmanager
async def worker_and_router(
    store_target: str, model: str, variant: EngineVariant, settings: EngineConfig
) -> AsyncIterator[ServingStack]:
    config = WorkerConfig(
        **dataclasses.asdict(variant.apply(settings)),
        port=0,
        model=model,
        adapter_store=store_target,
        log_level="WARNING",
    )
    worker = await start_worker(config, variant.make_lora_backend())
    try:
        router = await start_router(
            RouterConfig(
                port=0,
                workers=[f"127.0.0.1:{worker.port}"],
                adapter_store=store_target,
                max_running=ROUTER_BOUND,
                max_queued=ROUTER_BOUND,
                log_level="WARNING",
            )
        )
        try:
            yield ServingStack(worker, f"127.0.0.1:{router.port}")
        finally:
            await router.stop(grace=None)
    finally:
        await worker.stop()
