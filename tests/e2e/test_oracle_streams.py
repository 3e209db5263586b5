"""The whole stack over real sockets: 64 concurrent streams over 8 adapters of mixed ranks,
uploaded to the store as real PEFT folders, through the router to two CPU workers; every
stream's greedy tokens must be exactly the HF + PEFT oracle's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.client import AsyncManyloraClient
from services.common.base_model import DUMMY_PRESETS
from tests.e2e.stack import Stack, worker_stats
from tests.oracle import AdapterSpec, build_pair, greedy_oracle, make_peft_adapters

NEW_TOKENS = 10
STREAMS = 64
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
SPECS = (
    AdapterSpec("e2e-r8a", 8, 16, ("q_proj", "v_proj")),
    AdapterSpec("e2e-r8b", 8, 8, QKVO),
    AdapterSpec("e2e-r16a", 16, 32, QKVO),
    AdapterSpec("e2e-r16b", 16, 16, ("k_proj", "o_proj")),
    AdapterSpec("e2e-r32a", 32, 32, QKVO, use_rslora=True),
    AdapterSpec("e2e-r32b", 32, 64, ("q_proj", "v_proj")),
    AdapterSpec("e2e-r64a", 64, 128, QKVO),
    AdapterSpec("e2e-r64b", 64, 64, ("v_proj", "o_proj")),
)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory):
    """PEFT folders of the 8 adapters, the 64 requests, and the oracle's tokens for each."""
    _, hf = build_pair(DUMMY_PRESETS["tiny"], seed=0)  # the worker's dummy "tiny", seed 0
    peft_model, folders = make_peft_adapters(hf, SPECS, tmp_path_factory.mktemp("peft"))
    gen = torch.Generator().manual_seed(3)
    requests = []
    for i in range(STREAMS):
        prompt = torch.randint(3, 259, (4 + i % 5,), generator=gen).tolist()
        requests.append((SPECS[i % len(SPECS)].name, prompt))
    with one_torch_thread():
        expected = [greedy_oracle(peft_model, p, a, NEW_TOKENS)[0] for a, p in requests]
        base = [greedy_oracle(peft_model, p, None, NEW_TOKENS)[0] for _, p in requests[:16]]
    # Adapters strong enough that a request served without its adapter shows.
    assert sum(b != e for b, e in zip(base, expected, strict=False)) >= 12
    return folders, requests, expected


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The oracle's many tiny forwards run ~50x slower with 2 threads on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


async def test_64_streams_over_8_adapters_match_the_oracle(stack: Stack, oracle):
    folders, requests, expected = oracle
    await stack.start_store()
    await stack.upload({name: Path(path) for name, path in folders.items()})
    workers = [await stack.start_worker(), await stack.start_worker()]
    router = await stack.start_router()

    async with AsyncManyloraClient(f"127.0.0.1:{router.port}", timeout=60) as client:

        async def one(adapter: str, prompt: list[int]) -> list[int]:
            done = await client.complete(
                prompt, adapter=adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True
            )
            assert done.finish_reason == "length"
            return done.token_ids

        got = await asyncio.gather(*(one(a, p) for a, p in requests))

    mismatches = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatches, (
        f"{len(mismatches)} streams differ from the oracle, e.g. #{mismatches[0]}"
    )
    # Both workers served, each fetching from the store only the adapters it was sent.
    cached = [set((await worker_stats(w)).host_cached_adapters) for w in workers]
    assert all(cached)
    assert cached[0] | cached[1] == {spec.name for spec in SPECS}
