"""The routing policy on snapshots: affinity tiers, the load bound, rendezvous order."""

from __future__ import annotations

import hashlib
import math

from hypothesis import given
from hypothesis import strategies as st

from services.router.routing import Candidate, choose, load_bound

FACTOR = 1.25


def _place(adapter: str, workers: dict[str, Candidate], count: int, floor: int = 1) -> list[str]:
    """Place `count` requests one after another, each adding to its worker's load."""
    placed = []
    for i in range(count):
        choice = choose(adapter, f"req-{i}", list(workers.values()), FACTOR, floor)
        assert choice is not None
        c = workers[choice.address]
        workers[c.address] = Candidate(c.address, c.load + 1, c.on_gpu, c.in_host)
        placed.append(choice.address)
    return placed


def test_no_candidates_gives_none():
    assert choose("x", "r", [], FACTOR) is None


def test_gpu_residency_beats_host_cache_beats_none():
    gpu = Candidate("gpu:1", load=2, on_gpu=frozenset({"x"}))
    host = Candidate("host:1", load=1, in_host=frozenset({"x"}))
    cold = Candidate("cold:1", load=0)
    picks = [
        choose("x", "r", [cold, host, gpu], FACTOR, floor=4),
        choose("x", "r", [cold, host], FACTOR, floor=4),
        choose("x", "r", [cold], FACTOR, floor=4),
    ]
    assert [(c.address, c.affinity) for c in picks if c is not None] == [
        ("gpu:1", "gpu"),
        ("host:1", "host"),
        ("cold:1", "none"),
    ]


def test_resident_worker_takes_requests_until_its_load_bound():
    workers = {
        "a": Candidate("a", 0, on_gpu=frozenset({"hot"})),
        "b": Candidate("b", 0),
        "c": Candidate("c", 0),
    }
    placed = _place("hot", workers, 30)
    # Worked out by hand, not with load_bound: request i (0-based) finds i requests placed,
    # so a's bound is ceil(1.25 * (i + 1) / 3) (the request being placed counts), and a
    # takes request i exactly when its load is under that bound.
    assert [i for i, w in enumerate(placed) if w == "a"] == [
        0,
        2,
        4,
        7,
        9,
        12,
        14,
        16,
        19,
        21,
        24,
        26,
        28,
    ]
    assert placed.count("a") <= math.ceil(FACTOR * 30 / 3)
    assert placed.count("a") > placed.count("b")
    assert {"b", "c"} <= set(placed)  # one popular adapter does not pin everything to a


def test_load_bound_counts_the_request_being_placed():
    # (total load, workers, factor, floor) -> bound, from ceil(factor * (total + 1) / workers)
    cases = {
        (8, 4, 1.0, 1): 3,  # 9 / 4 = 2.25
        (2, 3, 1.25, 1): 2,  # 3.75 / 3 = 1.25
        (11, 4, 1.0, 1): 3,  # 12 / 4 = 3 exactly
        (0, 5, 1.0, 1): 1,  # never under one request
        (3, 2, 1.0, 4): 4,  # 4 / 2 = 2, lifted to the floor
        (9, 2, 1.5, 4): 8,  # 15 / 2 = 7.5, the floor does not cap
    }
    assert {args: load_bound(*args) for args in cases} == cases


def test_under_the_floor_affinity_holds_even_against_the_average():
    workers = {"a": Candidate("a", 0, on_gpu=frozenset({"hot"})), "b": Candidate("b", 0)}
    placed = _place("hot", workers, 6, floor=4)
    assert placed[:4] == ["a"] * 4  # 4 on a while b is idle: batching them is cheap
    assert placed[4] == "b"  # past the floor the average decides again


def test_cold_adapter_follows_one_rendezvous_order_across_routers():
    names = [f"w{i}:1" for i in range(5)]
    first = {
        adapter: choose(adapter, "r1", [Candidate(n, 0) for n in names], FACTOR)
        for adapter in (f"ad-{i}" for i in range(40))
    }
    # Another router, which lists its workers in another order, picks the same workers.
    again = {
        adapter: choose(adapter, "r2", [Candidate(n, 0) for n in reversed(names)], FACTOR)
        for adapter in first
    }
    assert first == again
    # Different adapters spread over the workers.
    assert len({c.address for c in first.values() if c is not None}) >= 4


def test_base_model_requests_go_to_the_least_loaded():
    workers = [Candidate("a", 3), Candidate("b", 1), Candidate("c", 2)]
    for i in range(10):
        choice = choose("", f"req-{i}", workers, FACTOR)
        assert choice is not None and choice.address == "b"


def test_stale_loads_over_every_bound_still_place_on_the_least_loaded():
    # Loads reported by other routers can exceed any bound computed from them: never refuse.
    workers = [Candidate("a", 50, on_gpu=frozenset({"x"})), Candidate("b", 40)]
    choice = choose("x", "r", workers, 1.0)
    assert choice is not None
    assert choice.address == "b"


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8), st.floats(1.0, 4.0))
def test_with_a_factor_of_one_or_more_the_least_loaded_is_always_under_the_bound(loads, factor):
    # min(loads) <= L / n < (L + 1) / n <= factor * (L + 1) / n <= bound: the router's config
    # (--load-bound >= 1) never leaves an adapter request without a worker under the bound.
    assert min(loads) < load_bound(sum(loads), len(loads), factor)


def test_when_every_worker_is_over_the_bound_the_least_loaded_says_where_it_holds_the_adapter():
    # Only a factor under 1 can put every worker over the bound: here ceil(0.5 * (L + 1) / 2)
    # is 8 (L = 30) or 5 (L = 19), under both loads.
    def pick(b: Candidate) -> tuple[str, str] | None:
        choice = choose("x", "r", [Candidate("a", 12, on_gpu=frozenset({"x"})), b], 0.5)
        return None if choice is None else (choice.address, choice.affinity)

    assert pick(Candidate("b", 18, on_gpu=frozenset({"x"}))) == ("a", "gpu")
    assert pick(Candidate("b", 7, on_gpu=frozenset({"x"}))) == ("b", "gpu")
    assert pick(Candidate("b", 7, in_host=frozenset({"x"}))) == ("b", "host")
    assert pick(Candidate("b", 7, on_gpu=frozenset({"y"}), in_host=frozenset({"y"}))) == (
        "b",
        "none",
    )


def test_base_model_requests_have_no_affinity():
    # Even a report listing "" (the base model's id) as resident gives it no affinity.
    workers = [
        Candidate("a", 3, on_gpu=frozenset({""})),
        Candidate("b", 1, in_host=frozenset({""})),
    ]
    choice = choose("", "r", workers, FACTOR)
    assert choice is not None and (choice.address, choice.affinity) == ("b", "none")


def test_default_floor_is_one_request():
    assert load_bound(0, 4, 1.0) == 1  # ceil(1 * 1 / 4) = 1, and the floor (1) adds nothing
    # a holds the adapter, but its load 1 is already the bound max(1, ceil(1.0 * 2 / 2)) = 1.
    workers = [Candidate("a", 1, on_gpu=frozenset({"x"})), Candidate("b", 0)]
    choice = choose("x", "r", workers, 1.0)
    assert choice is not None and (choice.address, choice.affinity) == ("b", "none")


def _documented_score(key: str, address: str) -> int:
    """services/router/README.md: the first 8 bytes of BLAKE2b("<key>\\0<address>"), read as
    a big-endian integer; the highest score ranks first."""
    digest = hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def test_cold_adapter_goes_to_the_top_of_the_documented_rendezvous_order():
    # Routers of different versions (a rolling upgrade) must rank alike: the order is the
    # documented hash, not any hash.
    names = [f"w{i}:1" for i in range(5)]
    for adapter in (f"ad-{i}" for i in range(20)):
        choice = choose(adapter, "r", [Candidate(n, 0) for n in names], FACTOR)
        expected = max(names, key=lambda n: _documented_score(adapter, n))
        assert choice is not None and choice.address == expected
