"""The one-launch decode LoRA experiment (benchmarks/lora_variants/one_launch.py) against the
torch reference with the cases and checks of tests/kernels/test_lora_kernels.py. On the CPU
(interpreter) its programs run one by one in id order, so every expand finds its request's
shrink done; the GPU test is where programs race: a CUDA graph of four groups back to back,
replayed with new inputs, so a counter left set by one launch would hand the next stale sums."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lora_variants.one_launch import lora_apply_one_launch
from kernels.lora_ref import lora_apply_ref
from tests.kernels.test_lora_kernels import (
    DECODE_CASES,
    GROUPS,
    LLAMA3_8B,
    LLAMA_7B,
    check_all_projections,
    make_case,
)


@pytest.mark.parametrize("name", DECODE_CASES)
def test_one_launch_matches_reference_fp32(name):
    shapes, ranks, adapters = DECODE_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(shapes, ranks, [1] * len(adapters), adapters, torch.float32, device, 9)
    check_all_projections(case, shapes, max(ranks), 1e-5, 9, apply=lora_apply_one_launch)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [LLAMA_7B, LLAMA3_8B], ids=["llama-7b", "llama3-8b"])
def test_one_launch_in_a_cuda_graph_matches_reference_replay_after_replay(shapes):
    batch, ranks = 64, [8, 16, 32, 64]
    choice = [-1 if i % 7 == 3 else i % len(ranks) for i in range(batch)]
    t = make_case(shapes, ranks, [1] * batch, choice, torch.bfloat16, "cuda", seed=3)
    tables = (t["lora_slots"], t["lora_meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    groups: list[tuple[int, ...]] = list(GROUPS)
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    widths: list[tuple[int, ...]] = []
    for projs in groups:
        in_f = shapes.dims(projs[0])[0]
        widths.append(tuple(shapes.dims(p)[1] for p in projs))
        ins.append(torch.zeros(batch, in_f, dtype=torch.bfloat16, device="cuda"))
        outs.append(torch.zeros(batch, sum(widths[-1]), dtype=torch.bfloat16, device="cuda"))

    def layer() -> None:
        for projs, x, out, w in zip(groups, ins, outs, widths, strict=True):
            lora_apply_one_launch(x, out, t["pool"], *tables, projs, w, 64)

    layer()  # compile, and make the kept counters before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    gen = torch.Generator().manual_seed(4)
    pool = t["pool"].float()
    for _ in range(5):
        for x, out in zip(ins, outs, strict=True):
            x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))
            out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for projs, x, out, w in zip(groups, ins, outs, widths, strict=True):
            want = lora_apply_ref(x.float(), torch.zeros_like(out, dtype=torch.float32), pool,
                                  *tables, projs, w)  # fmt: skip
            err = float((out.float() - want).norm() / want.norm())
            assert err < 1e-2, (projs, err)
