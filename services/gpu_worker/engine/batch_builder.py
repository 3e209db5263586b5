"""One step's `ForwardBatch` from its requests: the flat new tokens, their positions and
K/V slots, the per-request tables, and the LoRA plan. Python work here is per request, not
per token: the per-token tensors come from torch ops over the requests' starts and lengths,
after one host-to-device copy of everything the host knows.

With overlap scheduling (engine.py) a decoding request's last token may not be on the host
yet: the step that samples it is still running. Its input id is then taken on the device from
that step's sampled tokens (`DeviceTokens`), by one gather queued behind them; everything
else about the row (its position, its slots) the host knows, since it counts that token.
On CUDA the copy goes through pinned memory and is queued like the kernels: a blocking copy
would wait for the running step to finish."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.memory.adapter_manager import AdapterManager, ResidentAdapter
from services.gpu_worker.memory.adapter_tables import MLP_PROJS
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.memory.queued_copy import queued_to_device
from services.gpu_worker.model.lora_backend import LoraBackend


@dataclass(frozen=True)
class DeviceTokens:
    """The tokens a launched step samples, on the device and not read back yet."""

    tokens: torch.Tensor  # [B] int64: row i is the token of that step's i-th sampled request
    row_of: dict[int, int]  # a request's `Sequence.seq_id` -> its row in `tokens`


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

    def build(
        self,
        seqs: list[Sequence],
        q_lens: list[int] | None = None,
        in_flight: DeviceTokens | None = None,
    ) -> ForwardBatch:
        """The pass over `seqs`: request b brings its next `q_lens[b]` tokens (by default the
        rest of its prompt while it prefills, else its last token), and gets a logits row
        only when they reach the end of its prompt. A decoding request whose last token is
        still in flight takes it from `in_flight`."""
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
        gather = in_flight_inputs(seqs, q_lens, in_flight)
        tokens = ids.shape[0]
        ends = list(itertools.accumulate(q_lens))
        logits_rows = [
            end - 1
            for seq, n, end in zip(seqs, q_lens, ends, strict=True)
            if completes_prompt(seq, n)
        ]
        # Rows padded to a multiple of 4 int32s keep each row's start 16-byte aligned: Triton
        # compiles a kernel per pointer alignment, so a misaligned row would stall the step
        # of every new batch size with a compilation.
        pad = [0] * (-len(seqs) % 4)
        per_request = [
            [s.table_row for s in seqs] + pad,
            q_lens + pad,
            ctx_lens + pad,
            [r.row if r is not None else -1 for r in residents] + pad,
        ]
        # One host-to-device copy for everything the host knows; the rest is derived there.
        host = torch.cat(
            (
                ids,
                torch.tensor(logits_rows, dtype=torch.long),
                torch.tensor(per_request, dtype=torch.long).view(-1),
                torch.tensor(gather, dtype=torch.long).view(-1),
            )
        )
        on_device = queued_to_device(host, self.device)
        width = len(seqs) + len(pad)
        meta_end = tokens + len(logits_rows) + 4 * width
        meta = on_device[tokens + len(logits_rows) : meta_end].view(4, width).to(torch.int32)
        meta = meta[:, : len(seqs)]
        if gather[0]:
            assert in_flight is not None  # in_flight_inputs found rows only through it
            at, rows_in_flight = on_device[meta_end:].view(2, -1)
            on_device[:tokens].index_copy_(0, at, in_flight.tokens.index_select(0, rows_in_flight))
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


def in_flight_inputs(
    seqs: list[Sequence], q_lens: list[int], in_flight: DeviceTokens | None
) -> list[list[int]]:
    """[flat positions, rows of `in_flight.tokens`]: the decoding requests whose last token
    is still in flight, where their input id goes and where it comes from."""
    at: list[int] = []
    rows: list[int] = []
    for seq, start in zip(seqs, itertools.accumulate(q_lens, initial=0), strict=False):
        if seq.tokens_in_flight and not seq.prefilling:
            if in_flight is None or seq.seq_id not in in_flight.row_of:
                raise RuntimeError(f"request {seq.request_id}: its last token is nowhere")
            at.append(start)
            rows.append(in_flight.row_of[seq.seq_id])
    return [at, rows]


def new_tokens(seqs: list[Sequence], q_lens: list[int]) -> torch.Tensor:
    """The batch's input ids (int64, on the CPU): each prefilling request's next prompt chunk
    (a slice of its prompt tensor) and each decoding request's last token, in batch order;
    0 for a last token still in flight (`in_flight_inputs` says where it comes from)."""
    parts: list[torch.Tensor] = []
    last: list[int] = []  # a run of decoding requests' tokens, turned into one tensor
    for seq, n in zip(seqs, q_lens, strict=True):
        if seq.prefilling:
            if last:
                parts.append(torch.tensor(last, dtype=torch.long))
                last = []
            parts.append(seq.prompt_tokens(seq.num_cached, n))
        else:
            last.append(0 if seq.tokens_in_flight else seq.output_ids[-1])
    if last or not parts:
        parts.append(torch.tensor(last, dtype=torch.long))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
