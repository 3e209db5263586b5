"""CUDA graphs of the prompt-chunk pass, one per (token count, request count) bucket, so that
a step of prompt chunks alone costs a few copies and one replay instead of ~30 kernel
launches a layer from Python (20-28 ms of host time for Llama-7B). The engine replays them
for prompt-only steps; a mixed step's prompt pass runs eagerly behind its decodes' graph,
which already hides its launches (`Engine._forward`, measured in BENCHMARKS.md).

A pass of n tokens from m requests runs in the smallest bucket (T, B) with T >= n and
B >= m, over static buffers sized for the largest. Padding is harmless and reset each step:
- tokens n..T-1 belong to no request: position 0, K/V written to the scratch pair of pool
  slots. Their rows are computed (and attention leaves them garbage), but every op of the
  pass but attention is per row, and attention reads a request's rows only;
- requests m..B-1 bring no token: q_len 0, context 0, no adapter, starting at n. The paged
  prefill kernel's programs and the LoRA tiles of a request exit when a row is past its q_len;
- the LoRA kernels run over a static tile list of cdiv(T, 16) + B tiles (at least the
  batch's own, `kernels.lora.lora_tiles`), the rest starting at row 2**30 so they exit;
- the attention grid comes from `max_q_len`, the bucket's T, and the static view has no
  host lengths, so every request takes the prefill kernel (`ForwardBatch.decode_tail` 0);
  a one-token bucket is a decode batch to the model and takes the decode kernel;
- logits: B rows are captured; the batch's own (only the chunks that end their prompt have
  one) are copied into the first entries, the rest read row 0, and only the first come back.

Token buckets: a GEMM pays for padding rows, so past 256 tokens there are four a doubling
(at most 25% padding). Past TOKEN_CAP the eager pass's GPU time exceeds its host time, so a
graph would save nothing and its padding would cost: such passes run eagerly. (An estimate
from FLOPs, to be measured: Llama-7B's ~13 GFLOP a token take ~20 us at 650 TFLOP/s, so
~1,200 tokens keep an H200 busy for the ~25 ms the host needs to launch them.) Request
buckets are few: a padding request costs only programs that exit at once. Three LoRA kinds
as in DecodeGraphs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from services.gpu_worker.engine.decode_graphs import LORA_KINDS, lora_kind, require_graph_safe
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.graph_capture import no_collection_during_capture
from services.gpu_worker.model.model import LlamaForCausalLM

logger = logging.getLogger(__name__)

TOKEN_CAP = 2048
REQUEST_BUCKETS = (4, 16)
EXIT_ROW = 1 << 30  # a tile starting here is past any request's rows: its programs exit

_PER_TOKEN = ("input_ids", "positions", "new_k_slots", "new_v_slots")
_PER_REQUEST = ("req_rows", "q_starts", "q_lens", "ctx_lens", "seq_lens", "req_lora")


def token_buckets(max_tokens: int) -> list[int]:
    """64, 128, 256, then p, 1.25p, 1.5p, 1.75p for each power of two p, up to
    min(max_tokens, TOKEN_CAP), which is the last."""
    top = min(max_tokens, TOKEN_CAP)
    buckets, p = [], 64
    while p < top:
        steps = (p,) if p < 256 else (p, p * 5 // 4, p * 3 // 2, p * 7 // 4)
        buckets += [t for t in steps if t < top]
        p *= 2
    return [*buckets, top]


def bucket_pairs(max_tokens: int, max_requests: int) -> list[tuple[int, int]]:
    """Every (T, B) captured, smallest first. B never exceeds T: each request brings a token."""
    top = min(max_requests, REQUEST_BUCKETS[-1])
    requests = [b for b in REQUEST_BUCKETS if b < top] + [top]
    return sorted({(t, min(b, t)) for t in token_buckets(max_tokens) for b in requests})


class PrefillGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        template: ForwardBatch,
        max_tokens: int,
        max_requests: int,
        scratch_slots: tuple[int, int],
        max_rank: int,
    ):
        require_graph_safe(template)
        self.model, self.max_rank = model, max_rank
        self.pairs = bucket_pairs(max_tokens, max_requests)
        self.max_tokens = max(t for t, _ in self.pairs)
        self.max_requests = max(b for _, b in self.pairs)
        self._scratch = scratch_slots
        # Imported here, as the graph-safe backend does: Triton reads TRITON_INTERPRET when a
        # kernel is defined.
        from kernels.lora import BLOCK_T

        self._tile_rows = BLOCK_T  # rows of one LoRA tile (`kernels.lora.lora_tiles`)
        self.static = self._static_batch(template)
        self._graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int, str], torch.Tensor] = {}
        self.replays = 0

    def _static_batch(self, template: ForwardBatch) -> ForwardBatch:
        t, b, device = self.max_tokens, self.max_requests, template.pool.device

        def buffer(n: int, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
            return torch.full((n,), fill, dtype=dtype, device=device)

        self._tiles = torch.tensor([0, EXIT_ROW], dtype=torch.int32, device=device).repeat(
            self._tile_count(t, b), 1
        )
        self._arange = torch.arange(b, dtype=torch.int32, device=device)
        return replace(
            template,
            input_ids=buffer(t, torch.long),
            positions=buffer(t, torch.long),
            new_k_slots=buffer(t, torch.long, self._scratch[0]),
            new_v_slots=buffer(t, torch.long, self._scratch[1]),
            logits_rows=buffer(b, torch.long),
            req_rows=buffer(b, torch.int32),
            q_starts=buffer(b, torch.int32),
            q_lens=buffer(b, torch.int32),
            ctx_lens=buffer(b, torch.int32),
            seq_lens=buffer(b, torch.int32),
            req_lora=buffer(b, torch.int32, -1),
            max_q_len=t,
            host_q_lens=[],  # no host lengths: decode_tail 0, the prefill kernel for all
            host_ctx_lens=[],
            lora_plan=self._tiles,
        )

    def _tile_count(self, tokens: int, requests: int) -> int:
        # A request of q tokens has cdiv(q, BLOCK_T) <= q / BLOCK_T + 1 tiles.
        return -(-tokens // self._tile_rows) + requests

    def _view(self, tokens: int, requests: int, lora: str) -> ForwardBatch:
        s = self.static
        rows = {name: getattr(s, name)[:tokens] for name in _PER_TOKEN}
        rows |= {name: getattr(s, name)[:requests] for name in (*_PER_REQUEST, "logits_rows")}
        return replace(
            s,
            **rows,
            max_q_len=tokens,
            lora_plan=self._tiles[: self._tile_count(tokens, requests)],
            max_rank=0 if lora == "none" else self.max_rank,
            mlp_lora=lora == "all",
        )

    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with no_collection_during_capture():
            # Largest first: the rest reuse its memory.
            for tokens, requests in reversed(self.pairs):
                for lora in LORA_KINDS:
                    batch = self._view(tokens, requests, lora)
                    self.model(batch)  # compile the kernels and settle the allocator first
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._logits[(tokens, requests, lora)] = self.model(batch)
                    self._graphs[(tokens, requests, lora)] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d prefill graphs in %.1f s for (tokens, requests) %s",
            len(self._graphs),
            time.perf_counter() - start,
            self.pairs,
        )

    def bucket(self, tokens: int, requests: int) -> tuple[int, int] | None:
        """The smallest bucket holding a pass of `tokens` tokens from `requests` requests."""
        return next(((t, b) for t, b in self.pairs if t >= tokens and b >= requests), None)

    def fits(self, batch: ForwardBatch) -> bool:
        return self.bucket(batch.input_ids.shape[0], batch.q_lens.shape[0]) is not None

    def fill(self, batch: ForwardBatch) -> tuple[int, int]:
        """Copy a prompt-chunk batch into the static inputs, padding reset; its bucket."""
        n, m = batch.input_ids.shape[0], batch.q_lens.shape[0]
        bucket = self.bucket(n, m)
        if bucket is None:
            raise ValueError(f"no prefill graph holds {n} tokens of {m} requests")
        tokens, requests = bucket
        s = self.static
        for name in _PER_TOKEN:
            getattr(s, name)[:n].copy_(getattr(batch, name), non_blocking=True)
        s.positions[n:tokens].zero_()
        s.new_k_slots[n:tokens].fill_(self._scratch[0])
        s.new_v_slots[n:tokens].fill_(self._scratch[1])
        for name in _PER_REQUEST:
            getattr(s, name)[:m].copy_(getattr(batch, name), non_blocking=True)
        s.q_starts[m:requests].fill_(n)
        for name in ("q_lens", "ctx_lens", "seq_lens"):
            getattr(s, name)[m:requests].zero_()
        s.req_lora[m:requests].fill_(-1)
        sampled = batch.logits_rows.shape[0]
        s.logits_rows[:sampled].copy_(batch.logits_rows, non_blocking=True)
        s.logits_rows[sampled:requests].zero_()  # a larger batch's rows may lie past `tokens`
        self._fill_tiles(batch, self._tile_count(tokens, requests))
        return bucket

    def _fill_tiles(self, batch: ForwardBatch, count: int) -> None:
        """The batch's LoRA tiles first, then tiles that exit, up to the bucket's `count`."""
        plan = batch.lora_plan
        if plan is None:  # one token each (TritonLoraBackend plans nothing): a tile each
            m = batch.q_lens.shape[0]
            self._tiles[:m, 0].copy_(self._arange[:m])
            self._tiles[:m, 1].zero_()
            used = m
        elif isinstance(plan, torch.Tensor):
            used = plan.shape[0]
            self._tiles[:used].copy_(plan, non_blocking=True)
        else:
            raise TypeError(f"a prefill graph needs a LoRA tile list, not {type(plan).__name__}")
        self._tiles[used:count, 0] = 0
        self._tiles[used:count, 1] = EXIT_ROW

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_rows), vocab] of a prompt-chunk batch, by graph replay."""
        key = (*self.fill(batch), lora_kind(batch))
        self._graphs[key].replay()
        self.replays += 1
        return self._logits[key][: batch.logits_rows.shape[0]]
