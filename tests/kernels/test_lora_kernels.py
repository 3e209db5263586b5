"""The LoRA shrink/expand kernels against their torch references, over all seven linear
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

from kernels.lora import lora_expand, lora_shrink, lora_tiles
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref

# Projection index -> name, in the worker's meta order (gpu_worker/memory/adapter_tables.py).
PROJS = ("q", "k", "v", "o", "gate", "up", "down")
# Groups sharing one input, shrunk in one launch, as the model does.
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
):
    """A pool holding len(ranks) adapters over all seven projections, and a batch using them."""
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
    lora_slots = torch.zeros(len(ranks), max(sizes), dtype=torch.int32)
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
    """A [rows, cols] view into a wider tensor, so that row stride != cols: a kernel that reads
    or writes past column `cols` touches the extra columns."""
    wide = torch.randn(rows, cols + 24, generator=gen).to(dtype).to(device)
    return wide[:, :cols], wide


def _written_mask(t, proj_group, max_rank, total_rows):
    written = torch.zeros(total_rows, len(proj_group), max_rank, dtype=torch.bool)
    for b, m in enumerate(t["req_lora"].tolist()):
        if m >= 0:
            s, n = int(t["q_starts"][b]), int(t["q_lens"][b])
            for i, p in enumerate(proj_group):
                written[s : s + n, i, : int(t["lora_meta"][m, p, 0])] = True
    return written.to(t["pool"].device)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if float(want.norm()) == 0:
        return float(got.norm())
    return float((got - want).norm() / want.norm())


def check_all_projections(
    t, shapes: Shapes, max_rank: int, tol: float, seed: int, tiled: bool = False
) -> None:
    """Every projection group through both kernels against the references; with `tiled`,
    through the tile list of the requests that have an adapter (the mixed-step launch)."""
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
    for group in GROUPS:
        in_f = shapes.dims(group[0])[0]
        x, _ = _strided(total, in_f, dtype, device, gen)  # row stride != in_features
        y = lora_shrink(x, t["pool"], *tables, group, max_rank, max_q, tiles=tiles)
        y_ref = lora_shrink_ref(x.float(), pool_ref, *tables, group, max_rank)
        written = _written_mask(t, group, max_rank, total)
        assert bool(written.any())
        err = _rel_err(y[written], y_ref[written])
        assert err < tol, f"shrink relative error {err} (projections {group})"
        for i, proj in enumerate(group):
            out_dim = shapes.dims(proj)[1]
            base, base_wide = _strided(total, out_dim, dtype, device, gen)
            before = base_wide.clone()
            got = lora_expand(y, i, base, t["pool"], *tables, proj, max_q, tiles=tiles)
            want = lora_expand_ref(
                y_ref, i, before[:, :out_dim].float().clone(), pool_ref, *tables, proj
            )
            delta = got.float() - before[:, :out_dim].float()
            want_delta = want - before[:, :out_dim].float()
            used = [m for m in t["req_lora"].tolist() if m >= 0]
            if any(int(t["lora_meta"][m, proj, 0]) for m in used):
                assert want_delta.norm() > 0
            err = _rel_err(delta, want_delta)
            assert err < tol, f"expand relative error {err} (projection {PROJS[proj]})"
            # Nothing past out_features is written (the wider tensor's extra columns).
            assert torch.equal(base_wide[:, out_dim:], before[:, out_dim:])
            for b, m in enumerate(t["req_lora"].tolist()):
                if m < 0 or int(t["lora_meta"][m, proj, 0]) == 0:
                    s, n = int(t["q_starts"][b]), int(t["q_lens"][b])
                    assert torch.equal(got[s : s + n], before[s : s + n, :out_dim])


# hidden 64 over 32-wide slots, MLP width 80 = 2.5 slots (padded); one program walks all of
# in_features. hidden 512 / MLP 720 over 64-wide slots (11.25): the shrink splits in_features.
# MHA as Llama-7B has it: the slot width is the hidden size (rows of A of q/k/v/o/gate/up lie
# in one slot, down's span two). A mixed step: one long prompt among decodes.
SMALL = Shapes(64, 32, 80)
SPLIT = Shapes(512, 64, 720)
MHA = Shapes(64, 64, 80)
CPU_CASES = {
    "mixed-one-slot-rows": (MHA, [8, 16, 32, 64], [21, 1, 1, 1, 1], [3, 0, -1, 2, 1]),
    "decode-mixed-ranks": (SMALL, [8, 16, 32, 64], [1] * 7, [0, 1, -1, 2, 3, 1, -1]),
    "prefill-ragged": (SMALL, [8, 16, 32], [17, 3, 1, 33, 9], [2, -1, 0, 1, 2]),
    "decode-split-k": (SPLIT, [8, 32, 16], [1, 1, 1, 1], [0, 1, 2, -1]),
    "prefill-split-k": (SPLIT, [16, 8], [20, 2, 5], [1, 0, -1]),
}


@pytest.mark.parametrize("name", CPU_CASES)
def test_kernels_match_reference_fp32(name):
    shapes, ranks, q_lens, adapters = CPU_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(shapes, ranks, q_lens, adapters, torch.float32, device, seed=len(name))
    check_all_projections(case, shapes, max(ranks), tol=1e-5, seed=len(name))


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


@pytest.mark.parametrize("proj", [0, 1, 2, 4, 5])
def test_expand_into_a_column_slice_of_a_fused_output(proj):
    """The model's fused GEMMs give q, k, v (and gate, up) as column views of one output
    [T, q + 2 kv] (or [T, 2 inter]): expand must add into its slice only, at the fused row
    stride, leaving the columns before and after it as they were."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = make_case(SMALL, [8, 16, 32], [3, 1, 17, 2], [1, -1, 0, 2], torch.float32, device, seed=9)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    gen = torch.Generator().manual_seed(9)
    total, group = int(t["q_lens"].sum()), (0, 1, 2) if proj < 4 else (4, 5)
    x = torch.randn(total, SMALL.hidden, generator=gen).to(device)
    y = lora_shrink(x, t["pool"], *tables, group, 32, 17)
    widths = [SMALL.dims(p)[1] for p in group]
    fused = torch.randn(total, sum(widths), generator=gen).to(device)
    before = fused.clone()
    i = group.index(proj)
    start, width = sum(widths[:i]), widths[i]
    out = fused[:, start : start + width]
    assert out.stride(0) == fused.shape[1] and (start > 0 or width < fused.shape[1])
    lora_expand(y, i, out, t["pool"], *tables, proj, 17)
    want = lora_expand_ref(y, i, before[:, start : start + width].clone(), t["pool"], *tables, proj)
    assert not torch.equal(want, before[:, start : start + width])  # some row has the delta
    torch.testing.assert_close(fused[:, start : start + width], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused[:, :start], before[:, :start])
    assert torch.equal(fused[:, start + width :], before[:, start + width :])


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
    """A decode step's MLP LoRA (gate/up shrink, expand, down shrink, expand) captured once in
    a CUDA graph, then replayed after the batch's inputs and adapter choices changed in place:
    each replay must match the reference for the new inputs."""
    batch, ranks = 32, [8, 16, 32, 64]
    first = [i % len(ranks) for i in range(batch)]
    t = make_case(shapes, ranks, [1] * batch, first, torch.bfloat16, "cuda", seed=5)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    x = torch.zeros(batch, shapes.hidden, dtype=torch.bfloat16, device="cuda")
    hidden = torch.zeros(batch, shapes.intermediate, dtype=torch.bfloat16, device="cuda")
    gate = torch.zeros_like(hidden)
    down = torch.zeros_like(x)

    def step() -> None:
        y = lora_shrink(x, t["pool"], *tables, (4, 5), 64, 1)
        lora_expand(y, 0, gate, t["pool"], *tables, 4, 1)
        lora_expand(
            lora_shrink(hidden, t["pool"], *tables, (6,), 64, 1), 0, down, t["pool"], *tables, 6, 1
        )

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
        gate.zero_()
        down.zero_()
        graph.replay()
        pool_ref = t["pool"].float()
        y_gu = lora_shrink_ref(x.float(), pool_ref, *tables, (4, 5), 64)
        want_gate = lora_expand_ref(
            y_gu, 0, torch.zeros_like(gate, dtype=torch.float32), pool_ref, *tables, 4
        )
        y_d = lora_shrink_ref(hidden.float(), pool_ref, *tables, (6,), 64)
        want_down = lora_expand_ref(
            y_d, 0, torch.zeros_like(down, dtype=torch.float32), pool_ref, *tables, 6
        )
        assert _rel_err(gate.float(), want_gate) < 1e-2
        assert _rel_err(down.float(), want_down) < 1e-2
