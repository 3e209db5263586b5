"""The LoRA kernels (`lora_apply`: shrink, then expand into a fused output) against their
torch reference, over all seven linear
layers of a Llama layer (q, k, v, o, gate, up, down): random pools with shuffled slots,
ragged batches, mixed ranks (8..128), rows with no adapter, adapters that leave some
projections alone or give each its own rank, and MLP widths that are not a multiple of the
slot width (each row's last slot padded, and the padding poisoned with NaN so that a kernel
reading past a row's end fails). On the CPU the kernels run under TRITON_INTERPRET=1, which
tests/conftest.py sets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kernels.compile_watch import compile_watch
from kernels.lora import lora_apply, lora_tiles
from kernels.lora_launch import DEFAULT_LAUNCH, LoraLaunch, split_width
from kernels.lora_ref import lora_apply_ref

# Projection index -> name, in the worker's meta order (gpu_worker/memory/adapter_tables.py).
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
# Groups sharing one input, applied into one fused output, as the model does.
GROUPS = ((0, 1, 2), (3,), (4, 5), (6,))


@dataclass(frozen=True)
class Shapes:
    hidden: int
    kv_dim: int  # = the slot width W
    intermediate: int

    def dims(self, proj: int) -> tuple[int, int]:
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
        return ((h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h))[proj]


def module_ranks(adapter: int, rank: int) -> list[int]:
    """Each projection's rank in adapter `adapter` (largest: `rank`): some modules at half or
    a quarter of it, some left alone (rank 0)."""
    ranks = []
    for p in range(len(PROJS)):
        if (adapter + p) % 5 == 4:
            ranks.append(0)
        else:
            ranks.append(max(1, rank >> ((adapter + p) % 3)))
    ranks[(adapter * 3) % len(PROJS)] = rank  # the adapter's largest rank appears somewhere
    return ranks


def make_case(
    shapes: Shapes,
    ranks: list[int],
    q_lens: list[int],
    with_adapter: list[int],
    dtype: torch.dtype,
    device: str,
    seed: int,
    slots_width: int = 0,
):
    """A pool holding len(ranks) adapters over all seven projections, and a batch using them;
    the slot table has `slots_width` columns (the worker's is as wide whatever its adapters),
    else as many as the largest adapter needs."""
    gen = torch.Generator().manual_seed(seed)
    width = shapes.kv_dim
    sizes, metas, pads = [], [], []  # pads: (adapter, offset in its slot list, first bad col)
    for i, rank in enumerate(ranks):
        meta, offset = [], 0
        for p, r in enumerate(module_ranks(i, rank)):
            if r == 0:
                meta.append((0, 0, 0))
                continue
            in_f, out_f = shapes.dims(p)
            a_per_row, b_per_row = math.ceil(in_f / width), math.ceil(out_f / width)
            meta.append((r, offset, offset + r * a_per_row))
            for per_row, start, dim in (
                (a_per_row, offset, in_f),
                (b_per_row, offset + r * a_per_row, out_f),
            ):
                if dim % width:
                    pads += [
                        (i, start + row * per_row + per_row - 1, dim % width) for row in range(r)
                    ]
            offset += r * (a_per_row + b_per_row)
        sizes.append(offset)
        metas.append(meta)
    num_slots = sum(sizes) + 50
    pool = torch.randn(num_slots, width, generator=gen).to(dtype) / 4
    perm = torch.randperm(num_slots, generator=gen)
    lora_slots = torch.zeros(len(ranks), max(*sizes, slots_width), dtype=torch.int32)
    used = 0
    for i, size in enumerate(sizes):
        lora_slots[i, :size] = perm[used : used + size].int()
        used += size
    for adapter, index, first_bad in pads:
        pool[lora_slots[adapter, index], first_bad:] = float("nan")
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()[:-1]], dtype=torch.int32)
    tensors = {
        "pool": pool,
        "lora_slots": lora_slots,
        "lora_meta": torch.tensor(metas, dtype=torch.int32),
        "req_lora": torch.tensor(with_adapter, dtype=torch.int32),
        "q_starts": starts,
        "q_lens": torch.tensor(q_lens, dtype=torch.int32),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def _strided(rows: int, cols: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    """A [rows, cols] view at column 8 of a wider tensor, so that row stride != cols: a kernel
    that reads or writes outside its columns touches the extra ones."""
    wide = torch.randn(rows, cols + 24, generator=gen).to(dtype).to(device)
    return wide[:, 8 : 8 + cols], wide


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if float(want.norm()) == 0:
        return float(got.norm())
    return float((got - want).norm() / want.norm())


def check_all_projections(
    t,
    shapes: Shapes,
    max_rank: int,
    tol: float,
    seed: int,
    tiled: bool = False,
    apply=None,
    launch: LoraLaunch = DEFAULT_LAUNCH,
) -> None:
    """Every projection group through the kernels against the reference; with `tiled`,
    through the tile list of the requests that have an adapter (the mixed-step launch);
    `apply(x, out, pool, *tables, projs, widths, max_rank)`: another launch of a decode batch
    than `lora_apply`'s (a kernel variant under evaluation, benchmarks/lora_variants/)."""
    gen = torch.Generator().manual_seed(seed)
    device, dtype = t["pool"].device.type, t["pool"].dtype
    total = int(t["q_lens"].sum())
    max_q = int(t["q_lens"].max())
    tiles = None
    if tiled:
        used = [m >= 0 for m in t["req_lora"].tolist()]
        tiles = lora_tiles(used, t["q_lens"].tolist(), t["pool"].device)
    pool_ref = t["pool"].float()
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    adapters = [m for m in t["req_lora"].tolist() if m >= 0]
    for group in GROUPS:
        in_f = shapes.dims(group[0])[0]
        widths = tuple(shapes.dims(p)[1] for p in group)
        n = sum(widths)
        x, _ = _strided(total, in_f, dtype, device, gen)  # row stride != in_features
        out, wide = _strided(total, n, dtype, device, gen)
        before = wide.clone()
        if apply is None:
            lora_apply(x, out, t["pool"], *tables, group, widths, max_rank, max_q, launch, tiles)
        else:
            apply(x, out, t["pool"], *tables, group, widths, max_rank)
        start = before[:, 8 : 8 + n].float()
        want = lora_apply_ref(x.float(), start.clone(), pool_ref, *tables, group, widths)
        col = 0
        for proj, width in zip(group, widths, strict=True):
            cols = slice(col, col + width)
            delta, want_delta = out[:, cols].float() - start[:, cols], (want - start)[:, cols]
            if any(int(t["lora_meta"][m, proj, 0]) for m in adapters):
                assert want_delta.norm() > 0
            err = _rel_err(delta, want_delta)
            assert err < tol, f"relative error {err} (projection {PROJS[proj]})"
            for b, m in enumerate(t["req_lora"].tolist()):
                if m < 0 or int(t["lora_meta"][m, proj, 0]) == 0:
                    rows = slice(int(t["q_starts"][b]), int(t["q_starts"][b] + t["q_lens"][b]))
                    assert torch.equal(out[rows, cols], before[rows, 8 + col : 8 + col + width])
            col += width
        # Nothing outside the fused output's columns is written.
        assert torch.equal(wide[:, :8], before[:, :8])
        assert torch.equal(wide[:, 8 + n :], before[:, 8 + n :])


# hidden 64 over 32-wide slots, MLP width 80 = 2.5 slots (padded); one program walks all of
# in_features. hidden 512 / MLP 720 over 64-wide slots (11.25): the shrink splits in_features.
# MHA as Llama-7B has it: the slot width is the hidden size (rows of A of q/k/v/o/gate/up lie
# in one slot, down's span two). A mixed step: one long prompt among decodes.
SMALL = Shapes(64, 32, 80)
SPLIT = Shapes(512, 64, 720)
MHA = Shapes(64, 64, 80)
WIDE = Shapes(512, 512, 720)
# Decode batches (one token a request) for kernel variants under evaluation
# (tests/benchmarks/test_lora_*.py): (shapes, adapter ranks, each request's adapter; -1 none).
DECODE_CASES = {
    "one-slot-rows": (MHA, [8, 16, 32, 64], [3, 0, -1, 2, 1]),
    "mlp-past-slot-end": (SMALL, [8, 16, 32, 64], [0, 1, -1, 2, 3, 1, -1]),
    "split-k": (SPLIT, [8, 32, 16], [0, 1, 2, -1]),
}
CPU_CASES = {
    "mixed-one-slot-rows": (MHA, [8, 16, 32, 64], [21, 1, 1, 1, 1], [3, 0, -1, 2, 1]),
    "decode-mixed-ranks": (SMALL, [8, 16, 32, 64], [1] * 7, [0, 1, -1, 2, 3, 1, -1]),
    "prefill-ragged": (SMALL, [8, 16, 32], [17, 3, 1, 33, 9], [2, -1, 0, 1, 2]),
    "decode-split-k": (SPLIT, [8, 32, 16], [1, 1, 1, 1], [0, 1, 2, -1]),
    "prefill-split-k": (SPLIT, [16, 8], [20, 2, 5], [1, 0, -1]),
    # Largest ranks that are not a multiple of 16 (the kernels' y rows are padded to one).
    "prefill-rank-24": (SPLIT, [8, 24], [7, 1, 3], [1, 0, -1]),
    "decode-rank-8": (SMALL, [8, 4], [1, 1, 1], [0, -1, 1]),
}


# A decode batch takes the row kernels (lora_rows.py) by default; the tiled ones when told.
# One program walking all of a request's rank chunks, over fewer and wider splits: another
# path through the row shrink's loops.
TILED_DECODE = LoraLaunch(row_kernels=False)
ROWS_ONE_PROGRAM = LoraLaunch(
    row_rank_programs=1, max_k_splits=2, row_block_n=64, row_small_batch=0
)


# The request as the grid's slowest axis, with the rank-by-rank expand at any batch size.
ROWS_REQUEST_MAJOR = LoraLaunch(row_request_major=True, row_small_batch=0)


@pytest.mark.parametrize(
    "launch",
    [DEFAULT_LAUNCH, ROWS_ONE_PROGRAM, ROWS_REQUEST_MAJOR, TILED_DECODE],
    ids=["rows", "rows-one-program", "rows-request-major", "tiled"],
)
@pytest.mark.parametrize("name", CPU_CASES)
def test_kernels_match_reference_fp32(name, launch):
    shapes, ranks, q_lens, adapters = CPU_CASES[name]
    if launch is not DEFAULT_LAUNCH and max(q_lens) > 1:
        pytest.skip("the launch choice is a decode batch's")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(shapes, ranks, q_lens, adapters, torch.float32, device, seed=len(name))
    check_all_projections(case, shapes, max(ranks), tol=1e-5, seed=len(name), launch=launch)


@pytest.mark.parametrize("name", ["prefill-ragged", "prefill-split-k", "mixed-one-slot-rows"])
def test_tiled_launch_matches_reference_fp32(name):
    """A mixed step's launch: programs only for the tiles of requests with an adapter."""
    shapes, ranks, q_lens, adapters = CPU_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(shapes, ranks, q_lens, adapters, torch.float32, device, seed=7)
    check_all_projections(case, shapes, max(ranks), tol=1e-5, seed=7, tiled=True)


def test_tiles_cover_the_rows_of_requests_with_adapters_only():
    tiles = lora_tiles([True, False, True, True], [33, 5, 1, 16], torch.device("cpu"))
    assert tiles.tolist() == [[0, 0], [0, 16], [0, 32], [2, 0], [3, 0]]
    assert lora_tiles([False], [3], torch.device("cpu")).shape == (0, 2)


def test_meta_stride_is_the_number_of_projections():
    """A table of 7 projections must be read at stride 7: the MLP's meta rows sit past the
    four attention ones, and adapter 1's rows past adapter 0's seven."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(SMALL, [16, 8], [2, 3], [1, 0], torch.float32, device, seed=3)
    assert case["lora_meta"].shape[1] == 7
    check_all_projections(case, SMALL, 16, tol=1e-5, seed=3)


def test_a_row_does_not_depend_on_what_shares_its_batch():
    """A request's result must be the same bits alone or in any batch (the sampler's seeds
    promise the same text whatever shares the batch): the split of in_features and the order
    of its sums may depend on the shapes, never on the batch. (Slots of 512 leave room to
    split the down projection's 720 inputs in more than one way.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(WIDE, [8, 32, 16], [1, 1, 1, 1], [0, 1, 2, -1], torch.float32, device, 4)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, WIDE.intermediate, generator=gen).to(device)
    out = torch.zeros(4, WIDE.hidden, device=device)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    lora_apply(x, out, t["pool"], *tables, (6,), (WIDE.hidden,), 32, 1)
    for b in range(3):
        alone = torch.zeros(1, WIDE.hidden, device=device)
        one = (t["lora_slots"], t["lora_meta"], t["req_lora"][b : b + 1], *tables[3:])
        lora_apply(x[b : b + 1], alone, t["pool"], *one, (6,), (WIDE.hidden,), 32, 1)
        assert torch.equal(alone[0], out[b])


def test_splits_of_in_features_lie_in_one_slot():
    assert split_width(4096, 4096, 128, 8) == 512  # 8 splits
    assert split_width(4096, 11008, 128, 8) == 2048  # 6 splits, each in one slot
    assert split_width(1024, 14336, 128, 8) == 1024  # W caps it: 14 splits
    assert split_width(64, 720, 64, 8) == 64


def test_an_unknown_expand_accumulator_is_refused():
    with pytest.raises(ValueError, match="row_expand_accumulator 'sum'"):
        LoraLaunch(row_expand_accumulator="sum")


def test_bad_projection_lists_are_refused():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(SMALL, [8], [1], [0], torch.float32, device, 1)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    x, out = torch.zeros(1, 64, device=device), torch.zeros(1, 64, device=device)
    with pytest.raises(ValueError, match="one width each"):
        lora_apply(x, out, t["pool"], *tables, (0, 1), (64,), 8, 1)
    with pytest.raises(ValueError, match="do not cover"):
        lora_apply(x, out, t["pool"], *tables, (0,), (32,), 8, 1)


# Llama-7B (MHA: W = 4096, MLP 11008 = 2.69 slots) and Llama-3-8B / Mistral (GQA: W = 1024,
# MLP 14336 = 14 slots).
LLAMA_7B = Shapes(4096, 4096, 11008)
LLAMA3_8B = Shapes(4096, 1024, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [LLAMA_7B, LLAMA3_8B], ids=["llama-7b", "llama3-8b"])
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_kernels_match_reference_bf16_real_shapes(shapes, batch):
    """Batches of 1 and 8 are prefill (ragged, up to 90 rows a request); 32 and 128 decode."""
    ranks = [8, 16, 32, 64, 128]
    q_lens = [1] * batch if batch > 8 else [1 + 37 * i % 90 for i in range(batch)]
    adapters = [(-1 if i % 9 == 4 else i % len(ranks)) for i in range(batch)]
    case = make_case(shapes, ranks, q_lens, adapters, torch.bfloat16, "cuda", seed=batch)
    check_all_projections(case, shapes, 128, tol=1e-2, seed=batch)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [LLAMA_7B, LLAMA3_8B], ids=["llama-7b", "llama3-8b"])
def test_kernels_in_a_cuda_graph_follow_new_inputs(shapes):
    """A decode step's MLP LoRA (gate/up into their fused output, then down) captured once in
    a CUDA graph, then replayed after the batch's inputs and adapter choices changed in place:
    each replay must match the reference for the new inputs."""
    batch, ranks = 32, [8, 16, 32, 64]
    first = [i % len(ranks) for i in range(batch)]
    t = make_case(shapes, ranks, [1] * batch, first, torch.bfloat16, "cuda", seed=5)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    x = torch.zeros(batch, shapes.hidden, dtype=torch.bfloat16, device="cuda")
    hidden = torch.zeros(batch, shapes.intermediate, dtype=torch.bfloat16, device="cuda")
    down = torch.zeros_like(x)

    gate_up = torch.zeros(batch, 2 * shapes.intermediate, dtype=torch.bfloat16, device="cuda")
    widths = (shapes.intermediate, shapes.intermediate)

    def step() -> None:
        lora_apply(x, gate_up, t["pool"], *tables, (4, 5), widths, 64, 1)
        lora_apply(hidden, down, t["pool"], *tables, (6,), (shapes.hidden,), 64, 1)

    step()  # compile and make the cached projection lists before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(11)
    for choice in (first, [(-1 if i % 3 == 0 else (i * 5) % len(ranks)) for i in range(batch)]):
        t["req_lora"].copy_(torch.tensor(choice, dtype=torch.int32))
        x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))
        hidden.copy_(torch.randn(hidden.shape, generator=gen).to(x.dtype))
        gate_up.zero_()
        down.zero_()
        graph.replay()
        pool_ref = t["pool"].float()
        zeros = torch.zeros_like(gate_up, dtype=torch.float32)
        want_gate_up = lora_apply_ref(x.float(), zeros, pool_ref, *tables, (4, 5), widths)
        zeros = torch.zeros_like(down, dtype=torch.float32)
        want_down = lora_apply_ref(hidden.float(), zeros, pool_ref, *tables, (6,), (shapes.hidden,))
        assert _rel_err(gate_up.float(), want_gate_up) < 1e-2
        assert _rel_err(down.float(), want_down) < 1e-2


@pytest.mark.gpu
def test_batches_of_any_size_and_largest_rank_reuse_the_compiled_kernels():
    """Once decode batches of each row-expand shape (4: the tile; 48 and 96: rank by rank,
    with narrow outputs' column blocks halved at 48, as the engine's graph buckets capture
    them: test_lora_specializations.py) and a prefill batch (each launched tiled and not) have
    compiled the kernels, batches of other sizes, prompt lengths and largest ranks compile
    nothing: each compilation inside a served step stalls its whole batch for a second or
    more."""
    watch = compile_watch()

    def run(q_lens: list[int], ranks: list[int], seed: int) -> None:
        adapters = [(-1 if j % 5 == 3 else j % len(ranks)) for j in range(len(q_lens))]
        case = make_case(LLAMA_7B, ranks, q_lens, adapters, torch.bfloat16, "cuda", seed, 2048)
        for tiled in (False, True):
            check_all_projections(case, LLAMA_7B, max(ranks), 1e-2, seed, tiled=tiled)

    run([1] * 4, [8, 16], seed=1)
    run([1] * 48, [8, 16], seed=3)
    run([1] * 96, [8, 16], seed=4)
    run([5, 1, 17], [8, 16], seed=2)
    compiled = watch.total
    batches = [
        ([1] * 33, [8, 24]),
        ([1] * 128, [64, 32]),
        ([1] * 50, [16, 8]),
        ([300, 1, 1, 2], [8]),
        ([16, 64, 1, 1, 1], [40, 16]),
        ([1] * 7, [16]),
        ([2] * 16, [56, 8]),
    ]
    for seed, (q_lens, ranks) in enumerate(batches, start=10):
        run(q_lens, ranks, seed)
    assert (watch.total - compiled).count == 0


@pytest.mark.parametrize("launch", [DEFAULT_LAUNCH, TILED_DECODE], ids=["rows", "tiled"])
def test_a_request_without_rows_writes_nothing(launch):
    """A decode graph's padding: requests with no row (q_len 0) whose q_start points at another
    request's row, one of them with an adapter. Only the real requests' LoRA may land there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(SMALL, [8, 16], [1, 1, 1], [0, 1, -1], torch.float32, device, seed=9)
    t["q_lens"] = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=device)
    t["q_starts"] = torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=device)
    t["req_lora"] = torch.tensor([0, 1, -1, 0], dtype=torch.int32, device=device)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, SMALL.hidden, generator=gen).to(device)
    out = torch.zeros(2, SMALL.hidden, device=device)
    lora_apply(x, out, t["pool"], *tables, (0,), (SMALL.hidden,), 16, 1, launch)
    want = lora_apply_ref(x, torch.zeros_like(out), t["pool"], *tables, (0,), (SMALL.hidden,))
    assert want[0].norm() > 0 and want[1].norm() == 0
    assert _rel_err(out, want) < 1e-5


def check_within_rounding(t, shapes: Shapes, max_rank: int, seed: int, **launch_args) -> None:
    """Every projection group through `lora_apply(..., **launch_args)` against the float64
    reference: each output element within float32 rounding of its own terms (a sum that
    cancels has a large relative error and is still right), and bit for bit where no adapter
    touches it."""
    device = t["pool"].device
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    rows = int(t["q_lens"].sum())
    gen = torch.Generator().manual_seed(seed)
    pool = t["pool"].double()
    for group in GROUPS:
        in_f = shapes.dims(group[0])[0]
        widths = tuple(shapes.dims(p)[1] for p in group)
        x = torch.randn(rows, in_f, generator=gen).to(device)
        out = torch.randn(rows, sum(widths), generator=gen).to(device)
        before = out.clone()
        max_q = int(t["q_lens"].max())
        lora_apply(x, out, t["pool"], *tables, group, widths, max_rank, max_q, **launch_args)
        want = lora_apply_ref(x.double(), before.double(), pool, *tables, group, widths)
        zero = torch.zeros_like(want)
        scale = lora_apply_ref(x.double().abs(), zero, pool.abs(), *tables, group, widths)
        untouched = scale == 0
        assert torch.equal(out[untouched], before[untouched])
        err = (out.double() - want).abs()
        assert bool((err <= 2e-5 * (scale + before.double().abs())).all()), float(err.max())


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.sampled_from([SMALL, SPLIT, MHA]),
    ranks=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    requests=st.lists(st.tuples(st.integers(-1, 2), st.booleans()), min_size=1, max_size=6),
    bound=st.sampled_from([0, 64]),
    launch=st.sampled_from(
        [
            DEFAULT_LAUNCH,
            ROWS_ONE_PROGRAM,
            LoraLaunch(row_rank_programs=3),
            # The expand's shape of large batches (rank by rank) at these small ones.
            LoraLaunch(row_small_batch=0),
            LoraLaunch(row_small_batch=0, row_block_n=128, row_expand_min_programs=0),
            LoraLaunch(
                row_small_batch=0,
                row_expand_accumulator="tile",
                row_shrink_block_r=32,
                row_expand_block_r=64,
                row_block_n=128,
            ),
            LoraLaunch(row_small_batch=0, row_expand_accumulator="chunk", row_expand_block_r=32),
            # The request as the grid's slowest axis, with either expand.
            LoraLaunch(row_request_major=True),
            LoraLaunch(row_request_major=True, row_small_batch=0, row_rank_programs=3),
        ]
    ),
)
def test_any_decode_batch_matches_the_reference(shapes, ranks, requests, bound, launch):
    """Random decode batches through the row kernels: any ranks (not multiples of 16), requests
    with no adapter or no row, and the engine's larger rank bound (`bound` 64) or the batch's."""
    adapters = [min(m, len(ranks) - 1) for m, _ in requests]
    q_lens = [int(has_row) for _, has_row in requests]
    assume(any(q_lens))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(shapes, ranks, q_lens, adapters, torch.float32, device, seed=len(requests))
    check_within_rounding(t, shapes, max(bound, *ranks), sum(ranks), launch=launch)


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.sampled_from([SMALL, SPLIT, MHA]),
    ranks=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    requests=st.lists(st.tuples(st.integers(-1, 2), st.integers(0, 40)), min_size=1, max_size=4),
    tiled=st.booleans(),
)
def test_any_ragged_batch_matches_the_reference(shapes, ranks, requests, tiled):
    """Random prompt batches through the tiled kernels (ragged rows, some requests without
    rows or adapters), over every request's tiles or over the tile list of those with an
    adapter (a mixed step's launch)."""
    adapters = [min(m, len(ranks) - 1) for m, _ in requests]
    q_lens = [n for _, n in requests]
    assume(max(q_lens) > 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(shapes, ranks, q_lens, adapters, torch.float32, device, seed=sum(q_lens))
    tiles = lora_tiles([m >= 0 for m in adapters], q_lens, t["pool"].device) if tiled else None
    check_within_rounding(t, shapes, max(ranks), len(requests), tiles=tiles)
