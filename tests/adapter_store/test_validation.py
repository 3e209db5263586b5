"""Every refusal is INVALID_ARGUMENT naming the offending key, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from manylora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import canonicalize
from tests.adapter_store.helpers import (
    aio_channel,
    as_stream,
    make_peft_adapter,
    read_adapter,
    store_config,
    tiny_llama_config,
    upload_requests,
    upload_status,
)

MAX_RANK = 16
TINY = BaseModelShape.from_hf_config(load_hf_config("tiny"))
NAN_KEY = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
Upload = tuple[str, str, bytes, int]  # adapter_id, config JSON, weights, total_size
Case = Callable[[Path, Path], Upload]


def _peft(tmp: Path, **lora: object) -> Upload:
    make_peft_adapter(tmp / "made", seed=5, **lora)  # type: ignore[arg-type]
    config_json, weights = read_adapter(tmp / "made")
    return "ok-id", config_json, weights, 0


def _good(qv: Path) -> Upload:
    config_json, weights = read_adapter(qv)
    return "ok-id", config_json, weights, 0


def _edit_config(qv: Path, **changes: object) -> Upload:
    adapter_id, config_json, weights, size = _good(qv)
    return adapter_id, json.dumps({**json.loads(config_json), **changes}), weights, size


def _with_nan(qv: Path) -> Upload:
    adapter_id, config_json, weights, size = _good(qv)
    tensors = st_load(weights)
    tensors[NAN_KEY][3, 1] = float("nan")
    return adapter_id, config_json, bytes(st_save(tensors)), size


# name: (make the upload, pattern the status message must contain)
CASES: dict[str, tuple[Case, str]] = {
    "bad-json": (
        lambda qv, tmp: ("ok-id", "{not json", _good(qv)[2], 0),
        "^adapter_config.json: not valid JSON",
    ),
    "lm-head": (
        lambda qv, tmp: _peft(tmp, target_modules=["q_proj", "lm_head"]),
        r"^target_modules: 'lm_head' selects lm_head: LoRA on the output head",
    ),
    "bias-all": (lambda qv, tmp: _peft(tmp, bias="all"), "^bias: only 'none'"),
    "rank-over-max": (lambda qv, tmp: _peft(tmp, r=32), r"lora_A\.weight: rank 32 > max rank 16"),
    "wrong-shape": (
        lambda qv, tmp: _peft(tmp, llama=tiny_llama_config(hidden_size=64)),
        r"self_attn\.[qv]_proj\.lora_A\.weight: shape \[8, 64\] != \[8, 128\]",
    ),
    "nan": (lambda qv, tmp: _with_nan(qv), "^" + re.escape(NAN_KEY) + ": has non-finite"),
    "use-dora": (lambda qv, tmp: _peft(tmp, use_dora=True), "^use_dora: is set"),
    "bad-adapter-id": (lambda qv, tmp: ("../evil", *_good(qv)[1:]), "^adapter_id: '../evil'"),
    "total-size-mismatch": (
        lambda qv, tmp: (*_good(qv)[:3], len(_good(qv)[2]) + 1),
        "^total_size: the header says",
    ),
    "truncated-weights": (
        lambda qv, tmp: (*_good(qv)[:2], _good(qv)[2][:1000], 0),
        "^adapter_model.safetensors: not a readable",
    ),
    "alpha-pattern-not-number": (
        lambda qv, tmp: _edit_config(qv, alpha_pattern={"q_proj": "big"}),
        "^alpha_pattern.q_proj: must be a finite number",
    ),
    "rslora-not-bool": (
        lambda qv, tmp: _edit_config(qv, use_rslora="yes"),
        "^use_rslora: must be true or false",
    ),
    # Issue 11: config input that used to answer UNKNOWN or stall the store.
    "deep-nesting": (
        lambda qv, tmp: ("ok-id", '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", _good(qv)[2], 0),
        "^adapter_config.json: nested 100001 deep",
    ),
    "invalid-regex-key": (
        lambda qv, tmp: _edit_config(qv, rank_pattern={"q_proj[": 4}),
        r"^rank_pattern\.q_proj\[: .* regular-expression characters",
    ),
    "backtracking-key": (
        lambda qv, tmp: _edit_config(qv, alpha_pattern={"(.*.*)*q_proj$": 4}),
        r"^alpha_pattern\.\(\.\*\.\*\)\*q_proj\$: .* regular-expression characters",
    ),
    "regex-target-modules": (
        lambda qv, tmp: _edit_config(qv, target_modules=r".*\.(q|v)_proj"),
        "^target_modules: .* regular-expression characters",
    ),
    # Issue 12, case 4: PEFT would load q_proj only; the v_proj weights must not be served.
    "weights-outside-target-modules": (
        lambda qv, tmp: _edit_config(qv, target_modules=["q_proj"]),
        r"self_attn\.v_proj\.lora_[AB]\.weight: its module is not selected by target_modules",
    ),
    "down-proj-wrong-shape": (
        lambda qv, tmp: _peft(
            tmp, target_modules="all-linear", llama=tiny_llama_config(intermediate_size=256)
        ),
        r"mlp\.(gate|up|down)_proj\.lora_[AB]\.weight: shape \[\d+, \d+\] != ",
    ),
    "embed-tokens": (
        lambda qv, tmp: _edit_config(qv, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "^target_modules: 'embed_tokens' selects model.embed_tokens",
    ),
}


@pytest.mark.parametrize("make, named", CASES.values(), ids=CASES.keys())
async def test_refused_upload_is_invalid_argument_naming_key_and_leaves_nothing(
    tmp_path: Path, qv_adapter: Path, start_store, redis_proc, redis_client, make: Case, named: str
) -> None:
    adapter_id, config_json, weights, total_size = make(qv_adapter, tmp_path)
    data_dir = tmp_path / "data"
    config = store_config(data_dir, redis_url=redis_proc.url, max_rank=MAX_RANK)
    server = await start_store(config)
    requests = upload_requests(adapter_id, config_json, weights, total_size=total_size)
    code, details = await asyncio.to_thread(upload_status, server.port, requests)
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        listed = await stub.ListAdapters(common_pb2.ListAdaptersRequest())

    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert re.search(named, details), details
    assert list(listed.adapters) == []
    assert [p for p in data_dir.rglob("*") if p.name != ".tmp"] == []
    assert await redis_client.dbsize() == 0


async def test_good_adapter_is_accepted_by_the_same_checks(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    """The control case: without it, a store refusing everything would pass the above."""
    adapter_id, config_json, weights, _ = _good(qv_adapter)
    server = await start_store(store_config(tmp_path / "data", max_rank=MAX_RANK))
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        requests = upload_requests(adapter_id, config_json, weights, total_size=len(weights))
        info = await stub.UploadAdapter(as_stream(requests))
    assert (info.adapter_id, info.version, info.rank) == (adapter_id, 1, 8)
    assert info.size_bytes > len(weights) // 2


async def test_all_linear_mixed_rank_upload_is_stored_unpadded(tmp_path: Path, start_store) -> None:
    """all-linear with one projection at rank 16 and the rest at 2: stored about as large as
    the PEFT file, not padded to 16 everywhere (which would be about 5x)."""
    _, config_json, weights, _ = _peft(
        tmp_path, r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"o_proj": 16}
    )
    server = await start_store(store_config(tmp_path / "data", max_rank=MAX_RANK))
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        info = await stub.UploadAdapter(as_stream(upload_requests("al", config_json, weights)))
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (info.rank, sorted(info.target_modules)) == (16, sorted(modules))
    assert len(weights) - 16384 < info.size_bytes <= len(weights)


async def test_hostile_uploads_leave_another_clients_upload_and_fetch_working(
    tmp_path: Path, qv_adapter: Path, start_store
) -> None:
    """While one client sends configs that used to crash or stall the store, another uploads
    and fetches; both of its calls succeed with the right bytes."""
    server = await start_store(store_config(tmp_path / "data", max_rank=MAX_RANK))
    hostile = [make(qv_adapter, tmp_path) for make, _ in CASES.values()]
    _, config_json, weights, _ = _good(qv_adapter)
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)

        async def attacker() -> list[grpc.StatusCode]:
            codes = []
            for adapter_id, cfg, wts, size in hostile * 2:
                requests = upload_requests(adapter_id, cfg, wts, total_size=size)
                code, _ = await asyncio.to_thread(upload_status, server.port, requests)
                codes.append(code)
            return codes

        async def honest() -> tuple[int, bytes]:
            info = await stub.UploadAdapter(
                as_stream(upload_requests("honest", config_json, weights))
            )
            request = adapter_store_pb2.FetchAdapterRequest(adapter_id="honest")
            blob = b"".join([chunk.data async for chunk in stub.FetchAdapter(request)])
            return info.size_bytes, blob

        codes, (size, blob) = await asyncio.gather(attacker(), honest())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert len(blob) == size
    fetched = CanonicalAdapter.from_bytes(blob)
    expected = canonicalize("honest", config_json, weights, TINY, MAX_RANK)
    assert all(torch.equal(fetched.lora_b[p], expected.lora_b[p]) for p in ("q_proj", "v_proj"))
