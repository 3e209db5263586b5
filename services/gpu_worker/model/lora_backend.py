"""LoRA on a batch that mixes adapters of different ranks and rows with no adapter, as an
object chosen once per engine (see `backends.lora_backend_for`).

Both backends here read each adapter's A and Bᵀ from the unified pool, with no padding to the
largest rank: `TritonLoraBackend` through the adapter tables (the kernels of kernels/lora.py),
`TorchLoraBackend` through each adapter's slot list, two matrix products per adapter and
projection (the plain-torch reference, the CPU's path). A backend may need per-batch data beyond the
tables: `prepare` builds it once per batch, and the batch carries it as `lora_plan`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

import torch

from services.gpu_worker.memory.adapter_manager import ResidentAdapter
from services.gpu_worker.memory.adapter_tables import PROJ_INDEX

if TYPE_CHECKING:
    from kernels.lora_launch import LoraLaunch
    from services.gpu_worker.engine.forward_batch import ForwardBatch

_PROJ_NAME = {i: name for name, i in PROJ_INDEX.items()}


class LoraBackend(ABC):
    """out += x @ Aᵀ @ Bᵀ, each row with its own adapter, for the projections of one input."""

    # A CUDA graph can capture a decode batch's LoRA: it copies nothing to the device, reads
    # nothing back, and needs no plan for it (`prepare` gives None), since the graphs' static
    # batch carries none. The CUDA graphs (decode and prefill) refuse a backend that is not.
    cuda_graph_safe: bool = True
    # Whether a decode batch runs faster with its requests in descending adapter rank (the
    # engine then orders them so): kernels that start a request's programs together finish
    # sooner when the longest start first.
    decode_in_rank_order: bool = False

    def prepare(
        self,
        residents: Sequence[ResidentAdapter | None],
        q_lens: Sequence[int],
        device: torch.device,
    ) -> object:
        """What this backend needs of a batch beyond the adapter tables, given each request's
        resident adapter (None: the base model) and its count of new tokens, in batch order."""
        return None

    @abstractmethod
    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: ForwardBatch,
        layer: int,
        projs: tuple[int, ...],
        widths: Sequence[int],
    ) -> torch.Tensor:
        """out [T, sum(widths)] += x @ Aᵀ @ Bᵀ of each row's adapter, in place: projection
        projs[i] owns out's columns sum(widths[:i]) .. + widths[i] (q, k, v of the fused
        `qkv_proj` output share one input and one call; so do gate and up)."""


class TritonLoraBackend(LoraBackend):
    """The Triton kernels, reading the adapter tables; CUDA-graph safe. A batch where some
    request brings several tokens gets a tile list as its plan (`kernels.lora.lora_tiles`),
    so the kernels launch programs only for rows that have an adapter; a decode batch gets
    none, and its launch is the same whatever the batch holds (what a graph captures).
    `launch` (a `kernels.lora_launch.LoraLaunch`): the kernels' tiling, their default when
    None (benchmarks time others)."""

    def __init__(self, launch: LoraLaunch | None = None) -> None:
        # Imported here, not at module load: Triton reads TRITON_INTERPRET when a kernel is
        # defined, and a CPU worker never needs it.
        from kernels.lora import DEFAULT_LAUNCH, lora_apply, lora_tiles

        self._apply = lora_apply if launch is None else partial(lora_apply, launch=launch)
        self.decode_in_rank_order = (launch or DEFAULT_LAUNCH).row_request_major
        self._tiles = lora_tiles

    def prepare(
        self,
        residents: Sequence[ResidentAdapter | None],
        q_lens: Sequence[int],
        device: torch.device,
    ) -> torch.Tensor | None:
        if all(n == 1 for n in q_lens):
            return None
        return self._tiles([r is not None for r in residents], list(q_lens), device)

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: ForwardBatch,
        layer: int,
        projs: tuple[int, ...],
        widths: Sequence[int],
    ) -> torch.Tensor:
        return self._apply(
            x,
            out,
            batch.pool[layer],
            batch.lora_slots,
            batch.lora_meta,
            batch.req_lora,
            batch.q_starts,
            batch.q_lens,
            projs,
            tuple(widths),
            batch.max_rank,
            batch.max_q_len,
            tiles=cast(torch.Tensor | None, batch.lora_plan),
        )


@dataclass
class LoraGroup:
    """Rows of the flat batch that use one resident adapter."""

    adapter: ResidentAdapter
    rows: torch.Tensor


def _weight(pool: torch.Tensor, adapter: ResidentAdapter, proj: int, b_side: bool) -> torch.Tensor:
    """A [rank, in] (or Bᵀ [rank, out]) of one adapter for one layer's pool [num_slots, W]."""
    seg = adapter.segments[_PROJ_NAME[proj]]
    start, length = (seg.b_start, seg.b_len) if b_side else (seg.a_start, seg.a_len)
    dim = seg.out_features if b_side else seg.in_features
    rows = pool.index_select(0, adapter.slots[start : start + length]).view(seg.rank, -1)
    return rows[:, :dim]  # each row's last slot is padded when dim is not a multiple of W


class TorchLoraBackend(LoraBackend):
    """Plain torch, two matrix products per adapter and projection present in the batch: the
    reference.

    Its plan is each adapter's token rows, built per batch: on a GPU that would cost one
    host-to-device copy per distinct adapter per step, and a CUDA graph cannot capture it."""

    cuda_graph_safe = False

    def prepare(
        self,
        residents: Sequence[ResidentAdapter | None],
        q_lens: Sequence[int],
        device: torch.device,
    ) -> list[LoraGroup]:
        groups: dict[int, tuple[ResidentAdapter, list[int]]] = {}
        start = 0
        for resident, n in zip(residents, q_lens, strict=True):
            if resident is not None:
                rows = groups.setdefault(resident.row, (resident, []))[1]
                rows.extend(range(start, start + n))
            start += n
        return [
            LoraGroup(resident, torch.tensor(rows, device=device))
            for resident, rows in groups.values()
        ]

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: ForwardBatch,
        layer: int,
        projs: tuple[int, ...],
        widths: Sequence[int],
    ) -> torch.Tensor:
        pool = batch.pool[layer]
        for group in _groups(batch):
            rows = x.index_select(0, group.rows)
            col = 0
            for proj, width in zip(projs, widths, strict=True):
                if _PROJ_NAME[proj] in group.adapter.segments:
                    a = _weight(pool, group.adapter, proj, b_side=False)
                    bt = _weight(pool, group.adapter, proj, b_side=True)
                    out[:, col : col + width].index_add_(0, group.rows, (rows @ a.t()) @ bt)
                col += width
        return out


def _groups(batch: ForwardBatch) -> list[LoraGroup]:
    return cast(list[LoraGroup], batch.lora_plan)
