"""The engine: continuous batching over one model on one device.

Each `step` admits what fits, runs one mixed pass (prompt chunks within the step's token
budget, see scheduler.py, and one decode token for each running request that is past its
prompt), samples a token for every request whose prompt is done, streams outputs and frees
finished requests. Everything here runs on the single engine thread that owns the device.

Async output processing (`EngineConfig.async_output`, on by default): when step N's tokens
reach the host, each is appended to its request and what the token alone decides (EOS, a
stop token id, the length) ends its request at once, so that step N+1 is scheduled without
it. The rest of step N's per-token work (detokenizing, stop strings, the `StepOutput`, the
callback: pending_outputs.py) waits for the next `step`, which launches step N+1's pass and
sampling first and does that work while the device runs them, and only then waits for
step N+1's tokens. A stop string found there ends a request that step N+1 holds: its token
of step N+1 is discarded (`Sequence.finished`). A token's output is therefore streamed one
launch later than its step ends; `has_work` stays true while outputs wait, and a step with
nothing to run (or `flush`) delivers them.

Overlap scheduling (`EngineConfig.overlap_schedule`, on by default): `step` schedules and
launches step N+1 before it waits for step N's tokens, so the device goes from one step to the
next without waiting for the host. One step stays in flight between calls
(inflight_step.py). Step N+1 counts step N's tokens without their values: positions, slots
and seed indices include them (`Sequence.tokens_in_flight`), and a decode row takes its input
id from step N's sampled tokens on the device (batch_builder.py). A request whose step-N token
ends it by length is left out of step N+1; one that EOS or a stop token id ends is known only
after the wait, when step N+1 already holds it: that row is wasted and its token discarded,
like a stop string's (see `_end` for why its memory may go back while step N+1 runs). Each
call still delivers the previous call's outputs after its launch (or after the wait, with
`async_output` off), so every token is streamed once and in order. An abort drops a token
still in flight (never streamed, never counted).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch

from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    WorkerFault,
    status_details,
)
from services.gpu_worker.engine.batch_builder import BatchBuilder, DeviceTokens, completes_prompt
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.decode_graphs import DecodeGraphs
from services.gpu_worker.engine.engine_stats import EngineStats
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.inflight_step import InflightStep, StepResult
from services.gpu_worker.engine.pending_outputs import PendingToken, PendingTokens, token_output
from services.gpu_worker.engine.prefill_graphs import PrefillGraphs
from services.gpu_worker.engine.request_limits import RequestLimits
from services.gpu_worker.engine.running_limit import resolve_max_num_seqs
from services.gpu_worker.engine.sampling import Sampled, request_seed, sample_async
from services.gpu_worker.engine.scheduler import ScheduledStep, Scheduler
from services.gpu_worker.engine.sequence import FinishReason, Sequence
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.adapter_tables import max_adapter_slots
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.backends import lora_backend_for
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM

logger = logging.getLogger(__name__)

__all__ = ["Engine", "StepResult"]


def _adapter_rank(seq: Sequence) -> int:
    return seq.resident.rank if seq.resident is not None else 0


class Graphed(NamedTuple):
    """Which parts of a step's pass a CUDA graph replayed."""

    decode: bool
    prompt: bool


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
        self.limits = RequestLimits(self.model_config.vocab_size, self.max_model_len, self.max_rank)
        self.lora_backend = lora_backend or lora_backend_for(self.device)
        self.kv_tables = KvSlotTables(config.max_num_seqs, self.max_model_len, self.device)
        self.scheduler = Scheduler(config, self.pool, self.adapters, self.kv_tables)
        self.batches = BatchBuilder(self.pool, self.kv_tables, self.adapters, self.lora_backend)
        self.steps = 0
        # Seconds `step` calls spent waiting for the device's tokens (the rest of a call is
        # host work): tells a slow host from a slow device in a deployed worker.
        self.device_wait_seconds = 0.0
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self._scratch: tuple[int, int] | None = None  # pool slots the graphs' padding writes
        # Whether a step's outputs wait for the next step's launch (benchmarks flip it).
        self.async_output = config.async_output
        self._pending = PendingTokens()  # the last step's tokens whose outputs wait
        # Whether a step is launched before the previous one's tokens are read back.
        self.overlap_schedule = config.overlap_schedule
        self._in_flight: InflightStep | None = None  # launched, its tokens not read back

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
        template = self.build_batch([])
        self.graphs = DecodeGraphs(
            self.model, template, self.config.max_num_seqs, self._scratch_slots(), self.max_rank
        )
        self.graphs.capture()

    def capture_prefill_graphs(self) -> None:
        """Record the prompt-chunk pass as CUDA graphs (see prefill_graphs); CUDA only."""
        self.prefill_graphs = PrefillGraphs(
            self.model,
            self.build_batch([]),
            self.config.max_prefill_tokens,
            self.config.max_num_seqs,
            self._scratch_slots(),
            self.max_rank,
        )
        self.prefill_graphs.capture()

    def _scratch_slots(self) -> tuple[int, int]:
        """A K and a V slot for the graphs' padding rows, taken from the pool once."""
        if self._scratch is None:
            k, v = self.pool.reserve_scratch(2)
            self._scratch = (k, v)
        return self._scratch

    def check(self, seq: Sequence) -> None:
        """Refuse what can never run (InvalidArgument). Safe to call from any thread: it reads
        only what is fixed once the engine is built (its model, its pool's size)."""
        self.limits.check(seq)
        prompt_len = len(seq.prompt_ids)
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
        """End the request with this internal id (`Sequence.seq_id`); False if not here. A
        token of it still in flight (overlap scheduling) is dropped, never streamed."""
        self._deliver_pending(seq_id)  # its last token's output first, as if never deferred
        seq = self.scheduler.find(seq_id)
        if seq is None:
            return False
        self._end(seq)
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
        """Whether `step` has something to do: requests to run, a step in flight, or outputs
        to deliver."""
        sched = self.scheduler
        return bool(sched.running or sched.waiting or self._in_flight or len(self._pending))

    def flush(self) -> None:
        """Read back the step in flight, if any (overlap scheduling), and deliver every output
        still waiting (async output processing), in order."""
        self._drain(per_row_fallback=True)

    def _drain(self, per_row_fallback: bool) -> None:
        self._deliver_outputs()  # before the step in flight adds its requests' next tokens
        self._finish_in_flight(per_row_fallback)
        self._deliver_outputs()

    def _deliver_outputs(self) -> None:
        while (item := self._pending.take_oldest()) is not None:
            self._deliver(item)

    def step(self) -> StepResult | None:
        """One step; what it launched, or None when no pass was launched (nothing to run, or
        it failed). The previous step's outputs are delivered during it, and with overlap
        scheduling the previous step's tokens are read back in it (module docstring)."""
        scheduled = self.scheduler.schedule()
        if self.lora_backend.decode_in_rank_order:
            scheduled.decode.sort(key=_adapter_rank, reverse=True)  # stable: ties keep order
        self._drop_expired(scheduled.expired)
        if scheduled.empty:
            self.flush()  # no pass to overlap with
            return None
        try:
            launched = self._launch(scheduled)
        except Exception as exc:
            # The step in flight and the outputs waiting come before this step's failure; its
            # draw's logits may have been overwritten by the failed pass: no per-row retry.
            self._drain(per_row_fallback=False)
            self._pass_failed(scheduled.seqs, exc)
            return None
        self._deliver_outputs()  # the previous step's text work, while the device runs
        # A step launched over it may have overwritten its logits and taken its device tokens.
        self._finish_in_flight(per_row_fallback=False)
        done = True
        if self.overlap_schedule and launched.can_stay_in_flight:
            self._in_flight = launched
        else:
            self._deliver_outputs()  # the step just read back (overlap) before this one's
            done = self._finish(launched, per_row_fallback=True)
        if not self.async_output:
            self._deliver_outputs()
        return launched.result if done else None

    def _drop_expired(self, expired: list[Sequence]) -> None:
        for seq in expired:
            out = seq.output([], "", [], FinishReason.ABORTED)
            out.error = DeadlineExceeded("deadline passed while waiting; dropped before prefill")
            seq.on_output(out)

    def _launch(self, scheduled: ScheduledStep) -> InflightStep:
        """Queue the step's pass and the draw of its tokens (asynchronous on CUDA): every
        decode's, and that of each prompt chunk that ends its prompt."""
        ran, q_lens = scheduled.seqs, scheduled.q_lens
        sampled = [s for s, n in zip(ran, q_lens, strict=True) if completes_prompt(s, n)]
        previous = self._in_flight.device_tokens() if self._in_flight is not None else None
        logits, graphed = self._forward(scheduled, previous)
        pending = None
        if sampled:  # else the pass ran prompt chunks only, none the last of its prompt
            pending = sample_async(
                logits,
                [s.options for s in sampled],
                [s.seed for s in sampled],
                [s.next_token_index for s in sampled],
            )
        prefill, decode = len(scheduled.prefill), len(scheduled.decode)
        result = StepResult(prefill, decode, sum(q_lens), graphed.decode, graphed.prompt)
        return InflightStep.launched(ran, q_lens, sampled, pending, result)

    def _finish_in_flight(self, per_row_fallback: bool) -> None:
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._finish(step, per_row_fallback)

    def _finish(self, step: InflightStep, per_row_fallback: bool) -> bool:
        """Wait for a launched step's tokens and take them; False if its pass failed."""
        if step.pending is not None:
            began = time.perf_counter()
            try:
                sampled = step.pending.result(per_row_fallback)  # waits for the device
            except Exception as exc:
                self._pass_failed(step.ran, exc)
                return False
            finally:
                self.device_wait_seconds += time.perf_counter() - began
            self._take_tokens(step.sampled, sampled)
        self.steps += 1
        return True

    def _pass_failed(self, ran: list[Sequence], exc: Exception) -> None:
        """The pass itself failed: no request is to blame, the worker is. Its requests fail,
        but those that ended meanwhile (a stop string in the previous step's text)."""
        logger.exception("engine step failed; failing its %d requests", len(ran), exc_info=exc)
        fault = WorkerFault(status_details(f"engine step failed: {type(exc).__name__}: {exc}"))
        for seq in ran:
            if not seq.finished:
                self._fail(seq, fault)

    def _take_tokens(self, seqs: list[Sequence], sampled: Sampled) -> None:
        """Append each request's new token (or fail it alone); their outputs wait."""
        for seq, token, logprob, error in zip(
            seqs, sampled.token_ids, sampled.logprobs, sampled.errors, strict=True
        ):
            seq.tokens_in_flight -= 1
            if seq.finished:  # ended while this pass ran: the token was never its
                continue
            if error is not None:
                logger.warning("request failed: %s", error, extra={"request_id": seq.request_id})
                self._fail(seq, error)
                continue
            try:
                self._append(seq, token, logprob)
            except Exception as exc:
                logger.exception("request failed", extra={"request_id": seq.request_id})
                self._fail(seq, Internal(f"request failed after a token: {type(exc).__name__}"))

    def _end(self, seq: Sequence) -> None:
        """Take `seq` out for good and give back its memory, once (the scheduler forgets
        it). A step still running on the device may hold it: the next step, when a stop
        string ends it during that step (async output); with overlap scheduling, also when
        EOS, a stop token id, a failed row or an abort ends it, and the next `schedule` runs
        before that step's sync and may hand its table row, slots and adapter slots to
        another request. That is safe by stream order: the free slot list, the KV tables and
        the adapter tables live on the device and change only by work queued on the
        engine's stream after the running step's kernels (an adapter's copy on the
        prefetch stream first waits for the engine's stream: adapter_manager.py), so the
        running step reads and writes them before any new owner does; what it writes there
        (its K/V) no one reads, since a slot's new owner reads only what it wrote itself;
        and its token is discarded (`Sequence.finished`)."""
        seq.finished = True
        self.scheduler.remove(seq)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End one request with `error`, freeing what it holds."""
        self._end(seq)
        out = seq.output([], "", [], FinishReason.ABORTED)
        out.error = error
        seq.on_output(out)

    def _forward(
        self, scheduled: ScheduledStep, in_flight: DeviceTokens | None
    ) -> tuple[torch.Tensor, Graphed]:
        """Logits of the step's sampled rows in batch order, and which parts graphs ran;
        decodes whose last token is `in_flight` take it from there.

        A mixed step with captured graphs runs as two passes: its decodes replay a decode
        graph and its prompt chunks run eagerly. The eager pass launches ~25 kernels a layer
        from Python, ~20 ms of host time for Llama-7B whatever its size; launched behind the
        decode graph's replay, it overlaps the decodes' GPU time, at the cost of a second read
        of the weights (~3 ms on an H200). A step of prompt chunks alone has nothing to hide
        its launches behind: it replays a prefill graph when one holds it (`_prompt_pass`).
        Measured on an H200 (BENCHMARKS.md, fifth session): prompt-only steps 1.1-3.6x faster
        with the graph; a mixed step of 240 decodes and 540 prompt tokens 2-4% slower (its
        launches were already hidden, and the bucket's padding rows cost GEMM time)."""
        ran, q_lens = scheduled.seqs, scheduled.q_lens
        graphs = self.graphs
        split = scheduled.prefill and scheduled.decode
        if graphs is not None and split and graphs.fits(len(scheduled.decode)):
            decode = self.build_batch(scheduled.decode, [1] * len(scheduled.decode), in_flight)
            prefill = self.build_batch(scheduled.prefill, scheduled.chunks)
            decode_logits = graphs.run(decode)
            return torch.cat((self.model(prefill), decode_logits)), Graphed(True, False)
        batch = self.build_batch(ran, q_lens, in_flight)
        decode_graphs = self._graphs_for(batch, len(ran))
        if decode_graphs is not None:
            return decode_graphs.run(batch), Graphed(True, False)
        if not scheduled.decode:
            logits, prompt_graphed = self._prompt_pass(batch)
            return logits, Graphed(False, prompt_graphed)
        return self.model(batch), Graphed(False, False)

    def _prompt_pass(self, batch: ForwardBatch) -> tuple[torch.Tensor, bool]:
        """A pass of prompt chunks only: a prefill graph's replay when one holds the batch,
        else eager; and whether a graph ran."""
        graphs = self.prefill_graphs
        if graphs is not None and graphs.fits(batch):
            return graphs.run(batch), True
        return self.model(batch), False

    def _graphs_for(self, batch: ForwardBatch, num_seqs: int) -> DecodeGraphs | None:
        """The captured decode graphs when they can run this batch: one token per request,
        every request sampled (a graph returns every row's logits), and a bucket as large
        as the batch."""
        if self.graphs is None or not batch.is_decode or not self.graphs.fits(num_seqs):
            return None
        return self.graphs if batch.logits_rows.shape[0] == num_seqs else None

    def build_batch(
        self,
        seqs: list[Sequence],
        q_lens: list[int] | None = None,
        in_flight: DeviceTokens | None = None,
    ) -> ForwardBatch:
        """The pass over `seqs` (batch_builder.py)."""
        return self.batches.build(seqs, q_lens, in_flight)

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> None:
        """Append `token` to `seq` and end it now if the token alone ends it, so the next
        step is scheduled without it; its output waits in `_pending` (or is built at once
        when outputs are not deferred)."""
        seq.first_token_at = seq.first_token_at or time.monotonic()
        seq.output_ids.append(token)  # num_cached counted it when its step was launched
        finish = self._token_finish(seq, token)
        if finish is not None:
            self._end(seq)
        self._pending.add(PendingToken(seq, token, logprob, finish))

    def _deliver_pending(self, seq_id: int) -> None:
        item = self._pending.take(seq_id)
        if item is not None:
            self._deliver(item)

    def _deliver(self, item: PendingToken) -> None:
        """Build and hand over a token's output; a stop string in its text ends its request
        (see `_end` for why its memory can go back while the device runs the next step)."""
        seq = item.seq
        try:
            out = token_output(item)
            if out.finish_reason is not None:
                self._end(seq)
            seq.on_output(out)
        except Exception as exc:  # e.g. its detokenizer or stop strings: its failure alone
            logger.exception("request failed", extra={"request_id": seq.request_id})
            self._fail(seq, Internal(f"request failed after a token: {type(exc).__name__}"))

    def _token_finish(self, seq: Sequence, token: int) -> FinishReason | None:
        opts = seq.options
        if token in self.model_config.eos_token_ids and not opts.ignore_eos:
            return FinishReason.EOS
        if token in opts.stop_token_ids:
            return FinishReason.STOP
        if seq.reaches_length(len(seq.output_ids)):
            return FinishReason.LENGTH
        return None
