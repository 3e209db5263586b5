"""An adapter is resident on the GPU by what it is (id, version, sha256), never by which Python
object holds it.

A worker whose host cache is smaller than its working set fetches an adapter again for each
request, as a new object; the old one is freed when its requests finish, and CPython hands its
address to the next object of the same size. Residency keyed by `id(adapter)` then took a
freshly fetched adapter for the freed one and ran the request on the other adapter's slots.
"""

from __future__ import annotations

import copy
import hashlib
from collections import deque
from collections.abc import Callable

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from tests.gpu_worker.adapter_copies import AdapterCopies
from tests.oracle import TINY_MHA, AdapterSpec, build_pair, greedy_oracle, make_peft_adapters

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
SPECS = (
    AdapterSpec("id-r8", 8, 16, QKVO),
    AdapterSpec("id-r8b", 8, 8, ("q_proj", "v_proj")),
    AdapterSpec("id-r8c", 8, 32, QKVO),
    AdapterSpec("id-r8d", 8, 16, ("k_proj", "o_proj")),
)
REQUESTS = 48
NEW_TOKENS = 5
MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory):
    """Canonical blobs of four same-rank adapters (equal-sized objects, the worst case for
    address reuse), the requests, and HF + PEFT's greedy tokens for each."""
    ours, hf = build_pair(TINY_MHA)
    peft_model, folders = make_peft_adapters(hf, SPECS, tmp_path_factory.mktemp("peft"), seed=4)
    shape = ours.config.shape
    blobs = {
        name: load_peft_folder(path, shape, 64, name).to_bytes() for name, path in folders.items()
    }
    gen = torch.Generator().manual_seed(9)
    requests = []
    for i in range(REQUESTS):
        prompt = torch.randint(3, 259, (4 + i % 3,), generator=gen).tolist()
        requests.append((SPECS[(i * 3 + i // 4) % len(SPECS)].name, prompt))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = [greedy_oracle(peft_model, p, a, NEW_TOKENS)[0] for a, p in requests]
    finally:
        torch.set_num_threads(threads)
    return ours, blobs, requests, expected


def stream_through(
    engine: Engine, blobs: dict[str, bytes], requests: list[tuple[str, list[int]]], refetch: bool
) -> list[list[int]]:
    """Each request's tokens, submitted a few at a time (twice max_num_seqs in flight, so some
    wait and their adapters are prefetched). With `refetch` each request gets its adapter as
    a fresh object (a host cache that keeps nothing), freed once the request finishes;
    without, one object per adapter lives throughout."""
    kept = {name: _adapter_of(blob) for name, blob in blobs.items()}
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    got: dict[int, list[int]] = {}
    finished: deque[int] = deque()
    pending = deque(enumerate(requests))
    in_flight = 0

    def sink(index: int) -> Callable[[StepOutput], None]:
        def on_output(out: StepOutput) -> None:
            assert out.error is None, out.error
            got.setdefault(index, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finished.append(index)

        return on_output

    while pending or in_flight:
        while pending and in_flight < 2 * MAX_NUM_SEQS:
            index, (name, prompt) = pending.popleft()
            adapter = _adapter_of(blobs[name]) if refetch else kept[name]
            engine.add(
                Sequence(f"r{index}", prompt, options, ByteTokenizer(), sink(index), adapter)
            )
            del adapter
            in_flight += 1
        engine.step()
        while finished:
            finished.popleft()
            in_flight -= 1
    return [got[i] for i in range(len(requests))]


def _adapter_of(blob: bytes) -> CanonicalAdapter:
    adapter = CanonicalAdapter.from_bytes(blob)
    adapter.version, adapter.sha256 = 1, hashlib.sha256(blob).hexdigest()
    return adapter


def test_refetched_adapters_run_on_their_own_weights(oracle, monkeypatch):
    """Adapters fetched anew for each request, the previous objects freed as requests
    finish: every output must still be the oracle's."""
    ours, blobs, requests, expected = oracle
    engine = Engine(ours, EngineConfig(pool_slots=4096, max_num_seqs=MAX_NUM_SEQS))
    copies = AdapterCopies(engine.pool, monkeypatch)
    got = stream_through(engine, blobs, requests, refetch=True)
    wrong = [i for i in range(REQUESTS) if got[i] != expected[i]]
    assert not wrong, (
        f"requests {wrong} diverged from HF + PEFT (adapters {[requests[i][0] for i in wrong]})"
    )
    # One resident copy per adapter, however often each was fetched.
    assert copies.count == len(SPECS)
    assert sorted(engine.adapters.resident_ids()) == sorted(s.name for s in SPECS)


@pytest.mark.gpu
def test_refetched_adapters_on_the_gpu_match_long_lived_ones(oracle, monkeypatch):
    """The same on CUDA, where waiting requests' adapters are copied on a side stream: the
    refetched run must give exactly what a run with one live object per adapter gives."""
    ours, blobs, requests, _ = oracle
    model = copy.deepcopy(ours).to("cuda")
    reference = stream_through(
        Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=MAX_NUM_SEQS)),
        blobs,
        requests,
        refetch=False,
    )
    engine = Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=MAX_NUM_SEQS))
    copies = AdapterCopies(engine.pool, monkeypatch)
    assert stream_through(engine, blobs, requests, refetch=True) == reference
    assert copies.count == len(SPECS)


# --- AdapterManager alone: identity decides residency --------------------------------------


def _tiny_adapter(
    adapter_id: str, seed: int, version: int = 1, sha256: str = ""
) -> CanonicalAdapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = CanonicalAdapter(adapter_id, 4, 8.0, 2.0, "tiny", version=version, sha256=sha256)
    adapter.lora_a["q_proj"] = torch.randn(2, 4, 64, generator=gen)
    adapter.lora_b["q_proj"] = torch.randn(2, 64, 4, generator=gen)
    return adapter


@pytest.fixture
def manager() -> AdapterManager:
    pool = UnifiedMemoryPool(2, 512, 64, torch.float32, torch.device("cpu"))
    return AdapterManager(pool, max_loras=8, max_adapter_slots=64)


def test_an_equal_adapter_fetched_again_is_a_hit_with_no_second_copy(
    manager: AdapterManager, monkeypatch
):
    copies = AdapterCopies(manager.pool, monkeypatch)
    first = _tiny_adapter("a", seed=1, sha256="aa")
    again = CanonicalAdapter.from_bytes(first.to_bytes())  # another object, the same adapter
    again.version, again.sha256 = first.version, first.sha256
    held = manager.acquire(first)
    assert manager.is_resident(again)
    assert manager.missing_slots(again) == 0
    assert manager.acquire(again) is held
    assert (copies.count, manager.hits, manager.misses) == (1, 1, 1)
    assert held.refs == 2


def test_another_version_is_another_resident(manager: AdapterManager, monkeypatch):
    copies = AdapterCopies(manager.pool, monkeypatch)
    v1 = _tiny_adapter("a", seed=1, version=1, sha256="aa")
    v2 = _tiny_adapter("a", seed=2, version=2, sha256="bb")
    r1 = manager.acquire(v1)
    assert not manager.is_resident(v2)
    r2 = manager.acquire(v2)  # v1 is still referenced: both stay
    assert r1.row != r2.row and copies.count == 2
    manager.release(r1)  # v1 unreferenced while a newer version is resident: it goes at once
    assert not manager.is_resident(v1) and manager.is_resident(v2)
    assert manager.evictions == 1


def test_the_same_version_with_other_bytes_is_not_a_hit(manager: AdapterManager):
    """A store whose data was wiped starts its versions again at 1: the digest tells them apart."""
    old = _tiny_adapter("a", seed=1, version=1, sha256="aa")
    new = _tiny_adapter("a", seed=2, version=1, sha256="cc")
    manager.acquire(old)
    assert not manager.is_resident(new)


def test_an_address_reused_by_another_adapter_is_not_a_hit(manager: AdapterManager):
    """Frees one adapter and makes others until one lands at its address (CPython reuses it
    at once): that one must not be taken for the freed one."""
    first = _tiny_adapter("a", seed=1, sha256="aa")
    manager.release(manager.acquire(first))
    address = id(first)
    del first
    other: CanonicalAdapter | None = None
    for i in range(1000):
        other = _tiny_adapter(f"b{i}", seed=2, sha256=f"b{i}")
        if id(other) == address:
            break
        other = None
    if other is None:
        pytest.skip("CPython did not reuse the address (allocator dependent)")
    assert not manager.is_resident(other)
    assert manager.acquire(other).adapter_id == other.adapter_id


def test_a_pinned_old_version_loads_beside_the_newest(manager: AdapterManager):
    v1 = _tiny_adapter("a", seed=1, version=1, sha256="aa")
    v2 = _tiny_adapter("a", seed=2, version=2, sha256="bb")
    manager.acquire(v2)
    old = manager.acquire(v1)  # a request pinned to v1: loaded, not evicted as superseded
    assert manager.is_resident(v1) and old.refs == 1
    manager.release(old)
    assert not manager.is_resident(v1) and manager.is_resident(v2)
