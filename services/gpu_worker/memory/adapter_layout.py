"""How a canonical adapter lies over pool slots.

For each target projection p of rank r_p, each of the r_p rows of A [r_p, in] takes
ceil(in / W) slots and each row of Bᵀ [r_p, out] ceil(out / W) slots (W: the slot width,
num_kv_heads * head_dim), rows one after another, in the same order for every layer. Where
in (or out) is not a multiple of W, as Llama-7B's MLP width 11008 over W = 4096, the last
slot of each row is zero-padded; the kernels mask the tail. Each projection keeps its own
rank: a module of rank 8 takes rank-8 slots even in an adapter whose largest rank is 64.
The LoRA kernels read an adapter through its slot list and these segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.lora_format import CanonicalAdapter


def slots_per_row(features: int, width: int) -> int:
    """Slots one row of `features` values takes (the last one padded)."""
    return -(-features // width)


@dataclass(frozen=True)
class ProjSegment:
    """Where one projection's A and Bᵀ lie in the adapter's slot list."""

    rank: int
    in_features: int
    out_features: int
    a_start: int
    a_len: int
    b_start: int
    b_len: int


def _segments(adapter: CanonicalAdapter, width: int) -> dict[str, ProjSegment]:
    segments: dict[str, ProjSegment] = {}
    offset = 0
    for proj in adapter.target_modules:
        _, rank, in_f = adapter.lora_a[proj].shape
        out_f = adapter.lora_b[proj].shape[1]
        if rank == 0:
            continue
        a_len = rank * slots_per_row(in_f, width)
        b_len = rank * slots_per_row(out_f, width)
        segments[proj] = ProjSegment(rank, in_f, out_f, offset, a_len, offset + a_len, b_len)
        offset += a_len + b_len
    return segments


def adapter_slot_count(adapter: CanonicalAdapter, width: int) -> int:
    return sum(s.a_len + s.b_len for s in _segments(adapter, width).values())


@dataclass
class PackedAdapter:
    """An adapter laid out as pool rows: data [num_layers, num_slots, width] on the host."""

    adapter_id: str
    rank: int
    data: torch.Tensor
    segments: dict[str, ProjSegment]

    @property
    def num_slots(self) -> int:
        return int(self.data.shape[1])


def _fill(dest: torch.Tensor, rows: torch.Tensor, width: int) -> None:
    """Write rows [L, r, n] into dest [L, r * ceil(n / W), W], zeroing each row's padding."""
    num_layers, rank, features = rows.shape
    padded = dest.view(num_layers, rank, -1)  # [L, r, ceil(n / W) * W]
    padded[:, :, :features] = rows
    padded[:, :, features:] = 0


def pack_adapter(
    adapter: CanonicalAdapter, width: int, dtype: torch.dtype, pin: bool
) -> PackedAdapter:
    segments = _segments(adapter, width)
    num_layers = next(iter(adapter.lora_a.values())).shape[0]
    total = sum(s.a_len + s.b_len for s in segments.values())
    data = torch.empty(num_layers, total, width, dtype=dtype, pin_memory=pin)
    for proj, seg in segments.items():
        a = adapter.lora_a[proj].to(dtype)  # [L, r, in]
        bt = adapter.lora_b[proj].to(dtype).transpose(1, 2)  # [L, r, out]
        _fill(data[:, seg.a_start : seg.a_start + seg.a_len], a, width)
        _fill(data[:, seg.b_start : seg.b_start + seg.b_len], bt, width)
    return PackedAdapter(adapter.adapter_id, adapter.rank, data, segments)
