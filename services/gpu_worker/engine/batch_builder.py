"""One step's `ForwardBatch` from its requests: the flat new tokens, their positions and
K/V slots, the per-request tables, and the LoRA plan. Python work here is per request, not
per token: the per-token tensors come from torch ops over the requests' starts and lengths,
after one host-to-device copy of everything the host knows."""

from __future__ import annotations

import itertools

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.memory.adapter_manager import AdapterManager, ResidentAdapter
from services.gpu_worker.memory.adapter_tables import MLP_PROJS
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.lora_backend import LoraBackend


class BatchBuilder:
    """Builds batches over the engine's pool, slot tables and adapter tables, for its LoRA
    backend (which plans each batch's LoRA launches)."""

    def __init__(
        self,
        pool: UnifiedMemoryPool,
        kv_tables: KvSlotTables,
        adapters: AdapterManager,
        lora_backend: LoraBackend,
    ):
        self.pool, self.kv_tables, self.adapters = pool, kv_tables, adapters
        self.lora_backend = lora_backend
        self.device = pool.buffer.device

    def build(self, seqs: list[Sequence], q_lens: list[int] | None = None) -> ForwardBatch:
        """The pass over `seqs`: request b brings its next `q_lens[b]` tokens (by default the
        rest of its prompt while it prefills, else its last token), and gets a logits row
        only when they reach the end of its prompt."""
        if q_lens is None:
            q_lens = [len(s.prompt_ids) - s.num_cached if s.prefilling else 1 for s in seqs]
        ctx_lens = [s.num_cached for s in seqs]
        residents: list[ResidentAdapter | None] = [seq.resident for seq in seqs]
        max_rank, mlp_lora = 0, False
        for resident in residents:
            if resident is not None:
                max_rank = max(max_rank, resident.rank)
                mlp_lora = mlp_lora or not MLP_PROJS.isdisjoint(resident.segments)
        ids = new_tokens(seqs, q_lens)
        tokens = ids.shape[0]
        ends = list(itertools.accumulate(q_lens))
        logits_rows = [
            end - 1
            for seq, n, end in zip(seqs, q_lens, ends, strict=True)
            if completes_prompt(seq, n)
        ]
        per_request = [
            [s.table_row for s in seqs],
            q_lens,
            ctx_lens,
            [r.row if r is not None else -1 for r in residents],
        ]
        # One host-to-device copy for everything the host knows; the rest is derived there.
        host = torch.cat(
            (
                ids,
                torch.tensor(logits_rows, dtype=torch.long),
                torch.tensor(per_request, dtype=torch.long).view(-1),
            )
        )
        on_device = host.to(self.device)
        meta = on_device[tokens + len(logits_rows) :].view(4, len(seqs)).to(torch.int32)
        req_rows, q_lens_t, ctx_lens_t, req_lora = meta.unbind(0)
        q_starts = torch.cumsum(q_lens_t, 0, dtype=torch.int32) - q_lens_t
        max_q_len = max(q_lens, default=1)
        if max_q_len == 1:  # one token each: row b is request b, at position ctx_lens[b]
            rows, positions = req_rows.long(), ctx_lens_t.long()
        else:
            rows = torch.repeat_interleave(req_rows.long(), q_lens_t, output_size=tokens)
            # Token t of request b sits at position ctx_lens[b] + t - q_starts[b].
            shift = torch.repeat_interleave(
                (q_starts - ctx_lens_t).long(), q_lens_t, output_size=tokens
            )
            positions = torch.arange(tokens, device=self.device) - shift
        tables = self.kv_tables
        return ForwardBatch(
            input_ids=on_device[:tokens],
            positions=positions,
            new_k_slots=tables.k_table[rows, positions].long(),
            new_v_slots=tables.v_table[rows, positions].long(),
            logits_rows=on_device[tokens : tokens + len(logits_rows)],
            req_rows=req_rows,
            q_starts=q_starts,
            q_lens=q_lens_t,
            ctx_lens=ctx_lens_t,
            seq_lens=ctx_lens_t + q_lens_t,
            req_lora=req_lora,
            pool=self.pool.buffer,
            k_table=tables.k_table,
            v_table=tables.v_table,
            lora_slots=self.adapters.tables.slots,
            lora_meta=self.adapters.tables.meta,
            max_rank=max_rank,
            max_q_len=max_q_len,
            host_q_lens=q_lens,
            host_ctx_lens=ctx_lens,
            lora_backend=self.lora_backend,
            lora_plan=self.lora_backend.prepare(residents, q_lens, self.device),
            mlp_lora=mlp_lora,
        )


def completes_prompt(seq: Sequence, n: int) -> bool:
    """Whether `n` new tokens of `seq` reach the end of its prompt (always, when decoding):
    only then do its logits matter and a token is sampled."""
    return seq.num_cached + n >= len(seq.prompt_ids)


def new_tokens(seqs: list[Sequence], q_lens: list[int]) -> torch.Tensor:
    """The batch's input ids (int64, on the CPU): each prefilling request's next prompt chunk
    (a slice of its prompt tensor) and each decoding request's last token, in batch order."""
    parts: list[torch.Tensor] = []
    last: list[int] = []  # a run of decoding requests' tokens, turned into one tensor
    for seq, n in zip(seqs, q_lens, strict=True):
        if seq.prefilling:
            if last:
                parts.append(torch.tensor(last, dtype=torch.long))
                last = []
            parts.append(seq.prompt_tokens(seq.num_cached, n))
        else:
            last.append(seq.output_ids[-1])
    if last or not parts:
        parts.append(torch.tensor(last, dtype=torch.long))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
