"""Device tables through which the LoRA kernels find resident adapters' weights in the pool.

Row m of `slots [max_loras, max_adapter_slots]` lists the pool slots of one resident
adapter; `meta [max_loras, 4, 3]` holds (rank, a_start, b_start) per projection (q, k, v, o;
rank 0 when the adapter leaves one alone). See kernels/lora_ref.py for how they are read.
"""

from __future__ import annotations

import torch

from services.gpu_worker.adapter_layout import ProjSegment

PROJ_INDEX = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3}


class AdapterTables:
    def __init__(self, max_loras: int, max_adapter_slots: int, device: torch.device):
        self.slots = torch.zeros(max_loras, max_adapter_slots, dtype=torch.int32, device=device)
        self.meta = torch.zeros(max_loras, 4, 3, dtype=torch.int32, device=device)
        self._free_rows = list(range(max_loras - 1, -1, -1))

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def add(self, slots: torch.Tensor, segments: dict[str, ProjSegment]) -> int:
        """Write one adapter's slot list and segments into a free row; return the row."""
        if slots.numel() > self.slots.shape[1]:
            raise ValueError(
                f"adapter needs {slots.numel()} slots > table width {self.slots.shape[1]}"
            )
        row = self._free_rows.pop()
        self.slots[row, : slots.numel()] = slots.to(torch.int32)
        meta = torch.zeros(4, 3, dtype=torch.int32)
        for proj, seg in segments.items():
            meta[PROJ_INDEX[proj]] = torch.tensor([seg.rank, seg.a_start, seg.b_start])
        self.meta[row] = meta.to(self.meta.device)
        return row

    def remove(self, row: int) -> None:
        self.meta[row] = 0
        self._free_rows.append(row)
