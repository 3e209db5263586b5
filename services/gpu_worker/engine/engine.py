"""The engine: continuous batching over one model on one device.

Each `step` admits what fits, runs one mixed pass (prefill of the newly admitted requests and
one decode token for each running one), samples, streams outputs and frees finished requests.
Everything here runs on the single engine thread that owns the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    WorkerFault,
    status_details,
)
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.decode_graphs import DecodeGraphs
from services.gpu_worker.engine.engine_stats import EngineStats
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.running_limit import resolve_max_num_seqs
from services.gpu_worker.engine.sampling import request_seed, sample
from services.gpu_worker.engine.scheduler import Scheduler
from services.gpu_worker.engine.sequence import FinishReason, Sequence
from services.gpu_worker.memory.adapter_manager import AdapterManager, ResidentAdapter
from services.gpu_worker.memory.adapter_tables import MLP_PROJS, max_adapter_slots
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.backends import lora_backend_for
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one engine step ran through the model."""

    prefill_seqs: int  # requests whose prompt went through the model in this step
    decode_seqs: int  # requests that decoded one token
    tokens: int  # tokens through the model
    graph: bool  # a CUDA graph replayed the step (pure decode that fits a bucket)


class Engine:
    """Continuous batching over `model`, on its device and in its dtype (`config.device` and
    `config.dtype` tell setup.py where to build the model)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        lora_backend: LoraBackend | None = None,
    ):
        """`lora_backend`: how LoRA runs; the Triton kernels on CUDA, the torch reference
        elsewhere, unless given."""
        self.model = model
        self.config = config
        self.model_config = model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_model_len = min(
            config.max_model_len or 1 << 30, self.model_config.max_position_embeddings
        )
        self.pool = self._build_pool(config)
        config = self.config = resolve_max_num_seqs(config, self.pool, self.max_model_len)
        self.adapters = AdapterManager(
            self.pool,
            config.max_loras,
            max_adapter_slots(self.model_config, config.max_rank, self.pool.width),
        )
        self.max_rank = config.max_rank
        self.lora_backend = lora_backend or lora_backend_for(self.device)
        self.kv_tables = KvSlotTables(config.max_num_seqs, self.max_model_len, self.device)
        self.scheduler = Scheduler(config, self.pool, self.adapters, self.kv_tables)
        self.steps = 0
        self.graphs: DecodeGraphs | None = None

    def _build_pool(self, config: EngineConfig) -> UnifiedMemoryPool:
        """A pool of `config.pool_slots`, or of what `gpu_memory_fraction` of the device's
        free memory holds now (a fixed count on the CPU)."""
        model = self.model_config
        layers, width = model.num_layers, model.num_kv_heads * model.head_dim
        slots = config.pool_slots or UnifiedMemoryPool.default_slots(
            layers, width, self.dtype, self.device, config.gpu_memory_fraction
        )
        region = 0 if config.unified_pool else int(slots * config.adapter_region_fraction)
        return UnifiedMemoryPool(
            layers,
            slots,
            width,
            self.dtype,
            self.device,
            unified=config.unified_pool,
            adapter_region_slots=region,
        )

    def capture_decode_graphs(self) -> None:
        """Record the decode pass as CUDA graphs (see decode_graphs); CUDA only."""
        scratch = self.pool.reserve_scratch(2)
        template = self.build_batch([])
        self.graphs = DecodeGraphs(
            self.model,
            template,
            self.config.max_num_seqs,
            (scratch[0], scratch[1]),
            self.max_rank,
        )
        self.graphs.capture()

    def check(self, seq: Sequence) -> None:
        """Refuse what can never run (InvalidArgument). Safe to call from any thread: it reads
        only what is fixed once the engine is built (its model, its pool's size)."""
        prompt_len = len(seq.prompt_ids)
        if prompt_len == 0:
            raise InvalidArgument("prompt is empty")
        bad = [t for t in seq.prompt_ids if t >= self.model_config.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt token ids {bad[:5]} outside vocab of {self.model_config.vocab_size}"
            )
        if prompt_len >= self.max_model_len:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the model's context is {self.max_model_len}"
            )
        if seq.adapter is not None and seq.adapter.rank > self.max_rank:
            raise InvalidArgument(f"adapter rank {seq.adapter.rank} > max rank {self.max_rank}")
        total = min(prompt_len + seq.options.max_new_tokens, self.max_model_len)
        adapter_slots = self.adapters.slot_count(seq.adapter) if seq.adapter else 0
        if not self.pool.can_ever_fit(self.pool.kv_slots_for(total), adapter_slots):
            raise InvalidArgument(
                f"prompt + max_new_tokens = {total} tokens (and the adapter's "
                f"{adapter_slots} slots) can never fit the memory pool of "
                f"{self.pool.num_slots} slots ({self.pool.kv_slots_for(1)} per token)"
            )

    def add(self, seq: Sequence) -> None:
        """Check `seq`, then queue it."""
        self.check(seq)
        self.enqueue(seq)

    def enqueue(self, seq: Sequence) -> None:
        """Queue a request that `check` has passed."""
        seq.max_total_tokens = min(
            len(seq.prompt_ids) + seq.options.max_new_tokens, self.max_model_len
        )
        seq.seed = request_seed(seq.options)
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> bool:
        """End the request with this internal id (`Sequence.seq_id`); False if not here."""
        seq = self.scheduler.find(seq_id)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.on_output(seq.output([], "", [], FinishReason.ABORTED))
        logger.info("aborted", extra={"request_id": seq.request_id})
        return True

    def stats(self) -> EngineStats:
        """A snapshot of the engine's numbers; on the engine thread only."""
        sched, adapters = self.scheduler, self.adapters
        return EngineStats(
            running_requests=len(sched.running),
            waiting_requests=len(sched.waiting),
            pool=self.pool.stats(),
            resident_adapters=adapters.resident_ids(),
            adapter_cache_hits=adapters.hits,
            adapter_cache_misses=adapters.misses,
            adapter_evictions=adapters.evictions,
        )

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self) -> StepResult | None:
        """One step; what it ran, or None when no pass ran (nothing to run, or it failed)."""
        scheduled = self.scheduler.schedule()
        for seq in scheduled.expired:
            out = seq.output([], "", [], FinishReason.ABORTED)
            out.error = DeadlineExceeded("deadline passed while waiting; dropped before prefill")
            seq.on_output(out)
        if scheduled.empty:
            return None
        seqs = scheduled.prefill + scheduled.decode
        try:
            batch = self.build_batch(seqs)
            graphs = self._graphs_for(batch, len(seqs))
            logits = graphs.run(batch) if graphs is not None else self.model(batch)
            sampled = sample(
                logits,
                [s.options for s in seqs],
                [s.seed for s in seqs],
                [len(s.output_ids) for s in seqs],
            )
        except Exception as exc:
            # The pass itself failed: no request is to blame, the worker is.
            logger.exception("engine step failed; failing its %d requests", len(seqs))
            fault = WorkerFault(status_details(f"engine step failed: {type(exc).__name__}: {exc}"))
            for seq in seqs:
                self._fail(seq, fault)
            return None
        self.steps += 1
        prefill, decode = len(scheduled.prefill), len(scheduled.decode)
        result = StepResult(prefill, decode, sum(batch.host_q_lens), graphs is not None)
        for seq, token, logprob, error in zip(
            seqs, sampled.token_ids, sampled.logprobs, sampled.errors, strict=True
        ):
            if error is not None:
                logger.warning("request failed: %s", error, extra={"request_id": seq.request_id})
                self._fail(seq, error)
                continue
            try:
                self._append(seq, token, logprob)
            except Exception as exc:  # e.g. its detokenizer or stop strings: its failure alone
                logger.exception("request failed", extra={"request_id": seq.request_id})
                self._fail(seq, Internal(f"request failed after a token: {type(exc).__name__}"))
        return result

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End one request with `error`, freeing what it holds."""
        self.scheduler.remove(seq)
        out = seq.output([], "", [], FinishReason.ABORTED)
        out.error = error
        seq.on_output(out)

    def _graphs_for(self, batch: ForwardBatch, num_seqs: int) -> DecodeGraphs | None:
        """The captured decode graphs when they can run this batch: decode only, and a
        bucket as large as the batch."""
        if self.graphs is not None and batch.is_decode and self.graphs.fits(num_seqs):
            return self.graphs
        return None

    def build_batch(self, seqs: list[Sequence]) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        q_starts: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        residents: list[ResidentAdapter | None] = [seq.resident for seq in seqs]
        max_rank, mlp_lora = 0, False
        for seq in seqs:
            new = seq.prompt_ids if seq.num_cached == 0 else seq.output_ids[-1:]
            q_starts.append(len(ids))
            q_lens.append(len(new))
            ctx_lens.append(seq.num_cached)
            ids.extend(new)
            positions.extend(range(seq.num_cached, seq.num_cached + len(new)))
            token_rows.extend([seq.table_row] * len(new))
            if seq.resident is not None:
                max_rank = max(max_rank, seq.resident.rank)
                mlp_lora = mlp_lora or not MLP_PROJS.isdisjoint(seq.resident.segments)
        device, tables = self.device, self.kv_tables
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        rows = torch.tensor(token_rows, dtype=torch.long, device=device)

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=pos,
            new_k_slots=tables.k_table[rows, pos].long(),
            new_v_slots=tables.v_table[rows, pos].long(),
            logits_rows=torch.tensor(
                [s + n - 1 for s, n in zip(q_starts, q_lens, strict=True)], device=device
            ),
            req_rows=ints([s.table_row for s in seqs]),
            q_starts=ints(q_starts),
            q_lens=ints(q_lens),
            ctx_lens=ints(ctx_lens),
            seq_lens=ints([c + n for c, n in zip(ctx_lens, q_lens, strict=True)]),
            req_lora=ints([r.row if r is not None else -1 for r in residents]),
            pool=self.pool.buffer,
            k_table=tables.k_table,
            v_table=tables.v_table,
            lora_slots=self.adapters.tables.slots,
            lora_meta=self.adapters.tables.meta,
            max_rank=max_rank,
            max_q_len=max(q_lens, default=1),
            host_q_lens=q_lens,
            host_ctx_lens=ctx_lens,
            lora_backend=self.lora_backend,
            lora_plan=self.lora_backend.prepare(residents, q_lens, device),
            mlp_lora=mlp_lora,
        )

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> None:
        seq.first_token_at = seq.first_token_at or time.monotonic()
        seq.output_ids.append(token)
        seq.num_cached = len(seq.prompt_ids) + len(seq.output_ids) - 1
        finish = self._token_finish(seq, token)
        text, stopped = seq.stops.feed(seq.detokenizer.push(token))
        if stopped:
            finish = FinishReason.STOP
        elif finish is not None:
            tail, stopped = seq.stops.feed(seq.detokenizer.flush())
            text += tail if stopped else tail + seq.stops.flush()
        out = seq.output([token], text, [logprob] if logprob is not None else [], finish)
        if finish is not None:
            self.scheduler.remove(seq)
        seq.on_output(out)

    def _token_finish(self, seq: Sequence, token: int) -> FinishReason | None:
        opts = seq.options
        if token in self.model_config.eos_token_ids and not opts.ignore_eos:
            return FinishReason.EOS
        if token in opts.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= opts.max_new_tokens or seq.num_cached + 1 >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None
