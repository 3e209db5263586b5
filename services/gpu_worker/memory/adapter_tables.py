"""Device tables through which the LoRA kernels find resident adapters' weights in the pool.

Row m of `slots [max_loras, max_adapter_slots]` lists the pool slots of one resident
adapter; `meta [max_loras, NUM_PROJ, 3]` holds (rank, a_start, b_start) per projection in
PROJ_INDEX order (rank 0 when the adapter leaves one alone). See kernels/lora_ref.py for how
they are read.
"""

from __future__ import annotations

import torch

from services.common.base_model import LINEAR_MODULES, MLP_MODULES
from services.gpu_worker.memory.adapter_layout import ProjSegment, slots_per_row
from services.gpu_worker.memory.queued_copy import queued_to_device
from services.gpu_worker.model.model_config import ModelConfig

# q, k, v, o, gate, up, down: a projection's index in the meta table.
PROJ_INDEX = {proj: i for i, proj in enumerate(LINEAR_MODULES)}
NUM_PROJ = len(PROJ_INDEX)
# Projections that share their input, so that one shrink launch serves them all.
QKV = (PROJ_INDEX["q_proj"], PROJ_INDEX["k_proj"], PROJ_INDEX["v_proj"])
O_PROJ = (PROJ_INDEX["o_proj"],)
GATE_UP = (PROJ_INDEX["gate_proj"], PROJ_INDEX["up_proj"])
DOWN = (PROJ_INDEX["down_proj"],)
MLP_PROJS = frozenset(MLP_MODULES)


def max_adapter_slots(config: ModelConfig, max_rank: int, width: int) -> int:
    """Slots of an adapter of rank `max_rank` on every projection: a table row's width."""
    per_rank = 0
    for proj in PROJ_INDEX:
        in_f, out_f = config.shape.proj_dims(proj)
        per_rank += slots_per_row(in_f, width) + slots_per_row(out_f, width)
    return max_rank * per_rank


class AdapterTables:
    def __init__(self, max_loras: int, max_adapter_slots: int, device: torch.device):
        self.slots = torch.zeros(max_loras, max_adapter_slots, dtype=torch.int32, device=device)
        self.meta = torch.zeros(max_loras, NUM_PROJ, 3, dtype=torch.int32, device=device)
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
        unknown = sorted(set(segments) - set(PROJ_INDEX))
        if unknown:
            raise ValueError(f"no LoRA support for {', '.join(unknown)}")
        row = self._free_rows.pop()
        self.slots[row, : slots.numel()] = slots.to(torch.int32)
        meta = torch.zeros(NUM_PROJ, 3, dtype=torch.int32)
        for proj, seg in segments.items():
            meta[PROJ_INDEX[proj]] = torch.tensor([seg.rank, seg.a_start, seg.b_start])
        self.meta[row] = queued_to_device(meta, self.meta.device)
        return row

    def remove(self, row: int) -> None:
        self.meta[row] = 0
        self._free_rows.append(row)
