"""Where each running request's KV cache lies in the pool: one table row per request.

Row r of `k_table` (and `v_table`) lists, position by position, the pool slot holding the K
(and V) of that position's token for the request holding row r. The attention kernels read
these tables directly; rows are handed out at admission and come back when a request ends.
"""

from __future__ import annotations

import torch

from services.gpu_worker.memory.queued_copy import queued_to_device


class KvSlotTables:
    def __init__(self, max_rows: int, max_len: int, device: torch.device):
        self.k_table = torch.zeros(max_rows, max_len, dtype=torch.int32, device=device)
        self.v_table = torch.zeros(max_rows, max_len, dtype=torch.int32, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def take_row(self) -> int:
        return self._free_rows.pop()

    def write(
        self, rows: list[int], starts: list[int], counts: list[int], slots: torch.Tensor
    ) -> None:
        """Record `counts[i]` new tokens of row `rows[i]` from position `starts[i]` on.

        `slots` holds every new token's K slot, then every new token's V slot, in row order.
        All rows are written by one indexed copy per table: per-row slice writes would be two
        device copies per request, over a hundred launches a step at batch 64."""
        row_of: list[int] = []
        col_of: list[int] = []
        for row, start, n in zip(rows, starts, counts, strict=True):
            row_of.extend([row] * n)
            col_of.extend(range(start, start + n))
        total = len(row_of)
        index = torch.tensor([row_of, col_of], dtype=torch.long)
        index = queued_to_device(index, self.k_table.device)
        self.k_table[index[0], index[1]] = slots[:total]
        self.v_table[index[0], index[1]] = slots[total:]

    def release_row(self, row: int, length: int) -> torch.Tensor:
        """Give row `row` back; return the K and V slots of its first `length` positions
        (int64), for the pool to free."""
        slots = torch.cat((self.k_table[row, :length], self.v_table[row, :length]))
        self._free_rows.append(row)
        return slots.to(torch.int64)
