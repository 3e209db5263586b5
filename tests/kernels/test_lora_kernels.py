"""The LoRA shrink/expand kernels against their torch references, on random pools with
shuffled slots, ragged batches, mixed ranks (8..128), rows with no adapter, and adapters that
leave some projections alone. On the CPU the kernels run under TRITON_INTERPRET=1, which
tests/conftest.py sets."""

from __future__ import annotations

import pytest
import torch

from kernels.lora import lora_expand, lora_shrink
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref


def make_case(
    hidden: int, kv_dim: int, ranks: list[int], q_lens: list[int], with_adapter: list[int],
    dtype: torch.dtype, device: str, seed: int,
):  # fmt: skip
    """A pool holding len(ranks) adapters (q/k/v/o, some missing), and a batch using them."""
    gen = torch.Generator().manual_seed(seed)
    width = kv_dim
    dims = {0: (hidden, hidden), 1: (hidden, kv_dim), 2: (hidden, kv_dim), 3: (hidden, hidden)}
    sizes = []
    metas = []
    for i, rank in enumerate(ranks):
        meta, offset = [], 0
        for p in range(4):
            if (i + p) % 5 == 4:  # some adapters leave a projection alone
                meta.append((0, 0, 0))
                continue
            in_f, out_f = dims[p]
            a_len, b_len = rank * in_f // width, rank * out_f // width
            meta.append((rank, offset, offset + a_len))
            offset += a_len + b_len
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
    lora_meta = torch.tensor(metas, dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()[:-1]], dtype=torch.int32)
    tensors = {
        "pool": pool, "lora_slots": lora_slots, "lora_meta": lora_meta,
        "req_lora": torch.tensor(with_adapter, dtype=torch.int32),
        "q_starts": starts, "q_lens": torch.tensor(q_lens, dtype=torch.int32),
    }  # fmt: skip
    x = torch.randn(sum(q_lens), hidden, generator=gen).to(dtype)
    return {k: v.to(device) for k, v in tensors.items()}, x.to(device)


def _check_shrink_expand(case, max_rank, tol):
    t, x = case
    projs = (0, 1, 2)
    max_q = int(t["q_lens"].max())
    y = lora_shrink(x, t["pool"], t["lora_slots"], t["lora_meta"], t["req_lora"],
                    t["q_starts"], t["q_lens"], projs, max_rank, max_q)  # fmt: skip
    y_ref = lora_shrink_ref(x.float(), t["pool"].float(), t["lora_slots"], t["lora_meta"],
                            t["req_lora"], t["q_starts"], t["q_lens"], projs, max_rank)  # fmt: skip
    written = torch.zeros_like(y_ref, dtype=torch.bool)
    for b, m in enumerate(t["req_lora"].tolist()):
        if m >= 0:
            s, n = int(t["q_starts"][b]), int(t["q_lens"][b])
            for i, p in enumerate(projs):
                written[s : s + n, i, : int(t["lora_meta"][m, p, 0])] = True
    err = (y[written] - y_ref[written]).norm() / y_ref[written].norm()
    assert err < tol, f"shrink relative error {err}"
    for i, proj in enumerate(projs):
        out_dim = x.shape[1] if proj == 0 else t["pool"].shape[1]
        base = torch.randn(x.shape[0], out_dim, device=x.device).to(x.dtype)
        got = lora_expand(y, i, base.clone(), t["pool"], t["lora_slots"], t["lora_meta"],
                          t["req_lora"], t["q_starts"], t["q_lens"], proj, max_q)  # fmt: skip
        want = lora_expand_ref(y_ref, i, base.float().clone(), t["pool"].float(),
                               t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"],
                               t["q_lens"], proj)  # fmt: skip
        delta, want_delta = got.float() - base.float(), want - base.float()
        assert want_delta.norm() > 0
        err = (delta - want_delta).norm() / want_delta.norm()
        assert err < tol, f"expand relative error {err} (proj {proj})"
        untouched = [b for b, m in enumerate(t["req_lora"].tolist()) if m < 0]
        for b in untouched:  # rows without an adapter keep the base output exactly
            s, n = int(t["q_starts"][b]), int(t["q_lens"][b])
            assert torch.equal(got[s : s + n], base[s : s + n])


CPU_CASES = {
    # hidden 64: one program walks all of in_features
    "decode-mixed-ranks": (64, [8, 16, 32, 64], [1] * 7, [0, 1, -1, 2, 3, 1, -1]),
    "prefill-ragged": (64, [8, 16, 32], [17, 3, 1, 33, 9], [2, -1, 0, 1, 2]),
    # hidden 512 over 32-wide slots: the shrink splits in_features over 4 programs
    "decode-split-k": (512, [8, 32, 16], [1, 1, 1, 1], [0, 1, 2, -1]),
    "prefill-split-k": (512, [16, 8], [20, 2, 5], [1, 0, -1]),
}


@pytest.mark.parametrize("name", CPU_CASES)
def test_kernels_match_reference_fp32(name):
    hidden, ranks, q_lens, adapters = CPU_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(hidden, 32, ranks, q_lens, adapters, torch.float32, device, seed=len(name))
    _check_shrink_expand(case, max(ranks), tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_kernels_match_reference_bf16_llama7b_shapes(batch):
    ranks = [8, 16, 32, 64, 128]
    q_lens = [1] * batch if batch > 8 else [1 + 37 * i % 90 for i in range(batch)]
    adapters = [(-1 if i % 9 == 4 else i % len(ranks)) for i in range(batch)]
    case = make_case(4096, 4096, ranks, q_lens, adapters, torch.bfloat16, "cuda", seed=batch)
    _check_shrink_expand(case, 128, tol=1e-2)


@pytest.mark.gpu
def test_kernels_match_reference_bf16_gqa_shapes():
    case = make_case(4096, 1024, [8, 64, 16], [1, 5, 64, 1], [0, 1, 2, -1], torch.bfloat16,
                     "cuda", seed=9)  # fmt: skip
    _check_shrink_expand(case, 64, tol=1e-2)
