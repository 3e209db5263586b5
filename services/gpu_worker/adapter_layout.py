"""How a canonical adapter lies over pool slots.

For each target projection, A [r, in] is cut into r * in / width slots (row after row) and
Bᵀ [r, out] into r * out / width slots, in the same order for every layer. In Llama models
in and out are multiples of the slot width (num_kv_heads * head_dim), so nothing is padded.
The LoRA kernels read an adapter through its slot list and these segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.lora_format import CanonicalAdapter


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
        if in_f % width or out_f % width:
            raise ValueError(f"{proj}: {in_f}x{out_f} is not a multiple of slot width {width}")
        a_len, b_len = rank * in_f // width, rank * out_f // width
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
        data[:, seg.a_start : seg.a_start + seg.a_len] = a.reshape(num_layers, seg.a_len, width)
        data[:, seg.b_start : seg.b_start + seg.b_len] = bt.reshape(num_layers, seg.b_len, width)
    return PackedAdapter(adapter.adapter_id, adapter.rank, data, segments)
