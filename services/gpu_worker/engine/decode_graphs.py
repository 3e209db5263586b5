"""CUDA graphs of the decode pass, one per batch-size bucket, so that a decode step costs a
few copies and one graph replay instead of hundreds of kernel launches from Python.

Each bucket's graph reads static input buffers. A batch of B requests runs in the smallest
bucket >= B; the padding rows point at a scratch pair of pool slots (so their K/V writes
harm no one), have no adapter, and a sequence length of 0 (attention gives them zeros).
Three graphs per bucket: one with LoRA on all seven projections (its kernels sized for the
engine's max rank; tiles past a request's rank, or of a projection it leaves alone, exit at
once), one with LoRA on attention only (for batches whose adapters all leave the MLP alone:
no MLP LoRA launches), and one for batches of base-model requests only.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.graph_capture import no_collection_during_capture
from services.gpu_worker.model.model import LlamaForCausalLM

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
# Fields of a batch with one entry per request (= per token, in decode): sliced per bucket.
_PER_ROW = (
    "input_ids",
    "positions",
    "new_k_slots",
    "new_v_slots",
    "logits_rows",
    "req_rows",
    "q_starts",
    "q_lens",
    "ctx_lens",
    "seq_lens",
    "req_lora",
)
# The ones that change from step to step (the rest are fixed: row b is request b, one token).
_COPIED_PER_STEP = (
    "input_ids",
    "positions",
    "new_k_slots",
    "new_v_slots",
    "req_rows",
    "ctx_lens",
    "seq_lens",
    "req_lora",
)

# Which LoRA a graph runs: on every projection, on attention only, or none.
LORA_KINDS = ("all", "attention", "none")


def lora_kind(batch: ForwardBatch) -> str:
    if batch.max_rank == 0:
        return "none"
    return "all" if batch.mlp_lora else "attention"


def require_graph_safe(template: ForwardBatch) -> None:
    """Refuse a LoRA backend that plans per batch: a graph would freeze its plan."""
    if not template.lora_backend.cuda_graph_safe:
        raise ValueError(f"{type(template.lora_backend).__name__} cannot run inside CUDA graphs")


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        template: ForwardBatch,
        max_batch: int,
        scratch_slots: tuple[int, int],
        max_rank: int,
    ):
        require_graph_safe(template)
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_rank = max_rank
        n, device = self.buckets[-1], template.pool.device

        def buffer(dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            return torch.full((n,), fill, dtype=dtype, device=device)

        arange = torch.arange(n, device=device)
        self.static = replace(
            template,
            input_ids=buffer(torch.long, 3),
            positions=buffer(torch.long),
            new_k_slots=buffer(torch.long, scratch_slots[0]),
            new_v_slots=buffer(torch.long, scratch_slots[1]),
            logits_rows=arange.clone(),
            req_rows=buffer(torch.int32),
            q_starts=arange.to(torch.int32),
            q_lens=buffer(torch.int32, 1),
            ctx_lens=buffer(torch.int32),
            seq_lens=buffer(torch.int32),
            req_lora=buffer(torch.int32, -1),
            max_q_len=1,
            host_q_lens=[],
            host_ctx_lens=[],
            lora_plan=None,  # a graph-safe backend plans nothing for a decode batch
        )
        self._scratch = scratch_slots
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, str], torch.Tensor] = {}

    def _view(self, bucket: int, lora: str) -> ForwardBatch:
        rows = {name: getattr(self.static, name)[:bucket] for name in _PER_ROW}
        rank = 0 if lora == "none" else self.max_rank
        return replace(self.static, **rows, max_rank=rank, mlp_lora=lora == "all")

    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        with no_collection_during_capture():
            for bucket in reversed(self.buckets):  # largest first: smaller ones reuse its memory
                for lora in LORA_KINDS:
                    batch = self._view(bucket, lora)
                    for _ in range(2):  # compile the kernels and settle the allocator first
                        self.model(batch)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._logits[(bucket, lora)] = self.model(batch)
                    self._graphs[(bucket, lora)] = graph
        torch.cuda.synchronize()
        logger.info("captured decode graphs for batch sizes %s", self.buckets)

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def fill(self, batch: ForwardBatch) -> int:
        """Copy a decode batch into the static inputs; return the bucket that holds it."""
        size = batch.input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= size)
        s = self.static
        for name in _COPIED_PER_STEP:
            getattr(s, name)[:size].copy_(getattr(batch, name), non_blocking=True)
        if bucket > size:  # reset padding rows a previous, larger batch may have used
            s.new_k_slots[size:bucket].fill_(self._scratch[0])
            s.new_v_slots[size:bucket].fill_(self._scratch[1])
            s.seq_lens[size:bucket].zero_()
            s.req_lora[size:bucket].fill_(-1)
        return bucket

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode batch, by graph replay."""
        key = (self.fill(batch), lora_kind(batch))
        self._graphs[key].replay()
        return self._logits[key][: batch.input_ids.shape[0]]
