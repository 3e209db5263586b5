"""A real PEFT adapter goes in, the worker's source gets out exactly `canonicalize` of it, and
its canonical delta equals PEFT's own delta, module by module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from manylora.v1 import adapter_store_pb2_grpc
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.peft_adapter import canonicalize
from services.gpu_worker.adapters.store_adapter_source import StoreAdapterSource
from tests.adapter_store.helpers import (
    aio_channel,
    as_stream,
    make_peft_adapter,
    read_adapter,
    store_config,
    upload_requests,
)

TINY = BaseModelShape.from_hf_config(load_hf_config("tiny"))

CASES: dict[str, dict[str, Any]] = {
    "plain-qv": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "patterns-rslora-some-layers": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rank_pattern": {"q_proj": 4},
        "alpha_pattern": {"o_proj": 40},
        "use_rslora": True,
        "layers_to_transform": [0, 2],
    },
}


@pytest.mark.parametrize("lora", CASES.values(), ids=CASES.keys())
async def test_uploaded_adapter_fetched_by_worker_equals_canonicalize_and_peft_delta(
    tmp_path: Path, start_store, redis_proc, lora: dict[str, Any]
) -> None:
    folder = tmp_path / "adapter"
    peft_model = make_peft_adapter(folder, seed=3, **lora)
    config_json, weights = read_adapter(folder)
    server = await start_store(store_config(tmp_path / "data", redis_url=redis_proc.url))
    async with aio_channel(server.port) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        info = await stub.UploadAdapter(as_stream(upload_requests("rt", config_json, weights)))

    source = StoreAdapterSource(f"127.0.0.1:{server.port}", cache_max_bytes=1 << 30)
    fetched = await source.get("rt")
    await source.close()
    expected = canonicalize("rt", config_json, weights, TINY, max_rank=128)

    # Not the sha256: safetensors writes its metadata map in no fixed order.
    assert info.size_bytes == len(expected.to_bytes())
    assert (info.rank, info.version, list(info.target_modules)) == (
        8,
        1,
        sorted(lora["target_modules"]),
    )
    assert (fetched.rank, fetched.alpha, fetched.scaling) == (
        expected.rank,
        expected.alpha,
        expected.scaling,
    )
    assert fetched.target_modules == expected.target_modules
    for proj in expected.target_modules:
        assert torch.equal(fetched.lora_a[proj], expected.lora_a[proj])
        assert torch.equal(fetched.lora_b[proj], expected.lora_b[proj])

    peft_layers: Any = peft_model.base_model.model.model.layers  # type: ignore[union-attr]
    # The independent oracle: PEFT's LoRA layer output minus its base layer's output.
    torch.manual_seed(0)
    nonzero = 0
    with torch.no_grad():
        for layer_idx, layer in enumerate(peft_layers):
            for proj in lora["target_modules"]:
                module = getattr(layer.self_attn, proj)
                in_features, _ = TINY.proj_dims(proj)
                x = torch.randn(5, in_features)
                base = module.base_layer(x) if hasattr(module, "base_layer") else module(x)
                peft_delta = module(x) - base
                ours = x @ fetched.lora_a[proj][layer_idx].T @ fetched.lora_b[proj][layer_idx].T
                torch.testing.assert_close(ours, peft_delta, rtol=1e-4, atol=1e-5)
                nonzero += int(peft_delta.abs().max() > 1e-3)
    expected_nonzero = len(lora.get("layers_to_transform", range(TINY.num_layers)))
    assert nonzero == expected_nonzero * len(lora["target_modules"])


async def test_a_store_dtype_converts_uploads_before_they_are_stored(
    tmp_path: Path, start_store
) -> None:
    """--store-dtype bfloat16: an fp32 PEFT upload is stored, hashed and served as bf16, the
    same numbers as torch's own conversion of the canonical fp32 adapter; its size halves."""
    folder = tmp_path / "adapter"
    make_peft_adapter(folder, seed=4, **CASES["plain-qv"])
    config_json, weights = read_adapter(folder)
    expected = canonicalize("bf", config_json, weights, TINY, max_rank=128)
    assert expected.dtype_name == "float32"
    infos = {}
    for dtype in ("as-uploaded", "BFloat16"):
        server = await start_store(store_config(tmp_path / dtype, store_dtype=dtype))
        async with aio_channel(server.port) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            requests = upload_requests("bf", config_json, weights)
            infos[dtype] = await stub.UploadAdapter(as_stream(requests))
        source = StoreAdapterSource(f"127.0.0.1:{server.port}", cache_max_bytes=1 << 30)
        fetched = await source.get("bf")  # checks the served bytes against info's sha256
        await source.close()
        want = torch.float32 if dtype == "as-uploaded" else torch.bfloat16
        infos[dtype.lower()] = infos.pop(dtype)
        for proj in expected.target_modules:
            assert torch.equal(fetched.lora_a[proj], expected.lora_a[proj].to(want))
            assert torch.equal(fetched.lora_b[proj], expected.lora_b[proj].to(want))
    assert (infos["as-uploaded"].dtype, infos["bfloat16"].dtype) == ("float32", "bfloat16")
    assert infos["bfloat16"].size_bytes < 0.55 * infos["as-uploaded"].size_bytes
    assert infos["bfloat16"].sha256 != infos["as-uploaded"].sha256
