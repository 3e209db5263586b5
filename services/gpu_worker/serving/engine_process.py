"""The engine in a process of its own (`--engine-process`), seen from the gRPC process.

In one process the engine thread and the event loop share the GIL: every torch call and every
kernel launch of a step lets the event loop in, and while hundreds of streams are served its
per-token work holds the engine's host work back (BENCHMARKS.md, issue #20). Here the engine
runs in a spawned process (engine_child.py) and this process keeps the gRPC server, the
tokenizer and the adapter source. `EngineProcess` offers what `EngineLoop` offers the servicer
(`submit`, `abort`, `stats`, `stop`), so the servicer does not know which one it has.

Three threads of this process take part: the caller's (the event loop) checks and queues;
a sender thread writes the pipe, what was queued meanwhile as one message (an adapter's
weights, the first time a request needs them in the engine process, can take a while to
serialize); a receiver thread hands each step's outputs to their requests' callbacks.
If the engine process dies, every request it held fails as a worker fault, new ones are
refused as UNAVAILABLE, and `on_failure` is told.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from services.common.errors import ResourceExhausted, ServiceError, Unavailable, WorkerFault
from services.common.lora_format import AdapterKey, CanonicalAdapter
from services.gpu_worker.adapters.host_adapter_cache import adapter_nbytes
from services.gpu_worker.engine.engine_stats import EngineStats
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.serving import engine_child
from services.gpu_worker.serving.adapter_handoff import AdapterHandoff
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.engine_messages import EngineInfo, Submit

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


class EngineProcessFailed(RuntimeError):
    """The engine process could not be built, or died."""


class EngineProcess:
    def __init__(self, config: WorkerConfig, on_failure: Callable[[str], None] | None = None):
        """`on_failure(message)` is called (on the receiver thread) if the engine process
        dies while serving."""
        self._config = config
        self._on_failure = on_failure
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=engine_child.main, args=(config, child_conn), name="manylora-engine", daemon=True
        )
        self._child_conn = child_conn
        self._outgoing: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._seqs: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._submitted = 0  # requests sent; the engine's `settled` counts those it took
        self._settled = 0
        self._adapters = AdapterCopies(config.host_cache_bytes)
        self._handoff = AdapterHandoff()
        self._failure: str | None = None
        self._stopping = False
        self.info: EngineInfo | None = None
        self._stats: EngineStats | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def start(self) -> EngineInfo:
        """Start the engine process and wait until its engine is built (minutes for a large
        model); EngineProcessFailed if it cannot be."""
        self._process.start()
        self._child_conn.close()  # the child's end lives in the child now
        try:
            info = await asyncio.to_thread(self._wait_until_ready)
        except BaseException:  # cancelled while the model loads (a signal), or it failed
            self._process.kill()  # and the waiting thread sees it gone and returns
            raise
        self.info, self._stats = info, info.stats
        threading.Thread(target=self._send_messages, name="engine-pipe-out", daemon=True).start()
        threading.Thread(target=self._receive, name="engine-pipe-in", daemon=True).start()
        return info

    def _wait_until_ready(self) -> EngineInfo:
        while not self._conn.poll(0.5):
            if not self._process.is_alive():
                raise EngineProcessFailed(
                    f"the engine process exited (code {self._process.exitcode}) before it was ready"
                )
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise EngineProcessFailed("the engine process exited before it was ready") from None
        if kind != "ready":
            self._process.join(STOP_TIMEOUT_S)
            raise EngineProcessFailed(payload)
        info: EngineInfo = payload
        return info

    @property
    def stats(self) -> EngineStats:
        """The engine's numbers as of its last report; safe from any thread."""
        assert self._stats is not None, "start() first"
        return self._stats

    def submit(self, seq: Sequence) -> None:
        """Queue a request (from the event loop); raises InvalidArgument, ResourceExhausted or
        Unavailable at once when it is refused here. What only the engine can tell (the pool's
        size) comes back as the request's failed output."""
        assert self.info is not None, "start() first"
        self.info.limits.check(seq)
        bound = self.info.max_waiting
        with self._lock:
            if self._failure is not None:
                raise _worker_unavailable(self._failure)
            if self.stats.waiting_requests + self._submitted - self._settled >= bound:
                raise ResourceExhausted(f"waiting queue full ({bound}); retry later")
            self._submitted += 1
            self._seqs[seq.seq_id] = seq
        key = None
        if seq.adapter is not None:
            key = seq.adapter.key
            for message in self._adapters.messages_for(seq.adapter):
                self._outgoing.put(message)
        self._outgoing.put(
            (
                "submit",
                Submit(
                    seq.seq_id,
                    seq.request_id,
                    seq.prompt_ids,
                    seq.options,
                    key,
                    seq.deadline,
                    seq.arrival,
                ),
            )
        )

    def abort(self, seq: Sequence) -> None:
        self._outgoing.put(("abort", seq.seq_id))

    def stop(self) -> None:
        """Stop the engine process (its running requests end with it) and wait for it."""
        self._stopping = True
        self._outgoing.put(("stop",))
        self._outgoing.put(None)
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join(STOP_TIMEOUT_S)
        self._handoff.remove_leftovers()

    def _send_messages(self) -> None:
        """Everything queued so far as one batch: one read for the engine process."""
        while True:
            batch = [self._outgoing.get()]
            while not self._outgoing.empty():
                batch.append(self._outgoing.get_nowait())
            last = batch.index(None) if None in batch else len(batch)
            try:
                self._conn.send([self._serialized(m) for m in batch[:last] if m is not None])
            except OSError:  # the receiver sees the engine process gone and fails its requests
                self._handoff.remove_leftovers()
                return
            if last < len(batch):
                return

    def _serialized(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        """An adapter's weights as a file in shared memory, else as bytes (adapter_handoff.py;
        here, on the sender thread, off the event loop)."""
        if message[0] != "adapter":
            return message
        adapter: CanonicalAdapter = message[1]
        path = self._handoff.write(adapter)
        if path is None:
            return ("adapter", adapter.key, adapter.to_bytes())
        return ("adapter_file", adapter.key, path)

    def _receive(self) -> None:
        stall_s = self._config.engine_stall_timeout_s or None
        try:
            while True:
                if not self._conn.poll(stall_s):
                    if not self._stopping:
                        self._kill_frozen(stall_s)
                    return
                _, outputs, stats = self._conn.recv()
                if stats is not None:  # first: a client that sees its end sees it counted
                    with self._lock:
                        self._stats, self._settled = stats
                self._deliver(outputs)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("reading the engine process's outputs failed")
        if not self._stopping:
            self._process.join(1.0)
            self._fail_everything(f"the engine process exited (code {self._process.exitcode})")

    def _kill_frozen(self, stall_s: float | None) -> None:
        """A frozen engine process (a hung device call, a stopped process) would hold its
        requests forever while this process still answers health checks."""
        message = f"the engine process sent nothing for {stall_s:g} s; killed as frozen"
        logger.error(message)
        self._process.kill()
        self._process.join(STOP_TIMEOUT_S)
        self._fail_everything(message)

    def _deliver(self, outputs: list[tuple[int, StepOutput]]) -> None:
        for seq_id, out in outputs:
            seq = self._seqs.get(seq_id)
            if seq is None:
                continue
            if out.finish_reason is not None or out.error is not None:
                self._seqs.pop(seq_id, None)
                # The engine's timestamps, as offsets from its arrival (tracing's phases).
                seq.scheduled_at = seq.arrival + out.queue_time_ms / 1000
                seq.first_token_at = seq.arrival + out.time_to_first_token_ms / 1000
            seq.on_output(out)

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            self._failure = message
            seqs, self._seqs = list(self._seqs.values()), {}
        logger.error("%s: failing its %d requests", message, len(seqs))
        self._handoff.remove_leftovers()
        for seq in seqs:
            out = seq.output([], "", [], FinishReason.ABORTED)
            out.error = WorkerFault(message)
            seq.on_output(out)
        if self._on_failure is not None:
            self._on_failure(message)


def _worker_unavailable(message: str) -> ServiceError:
    error = Unavailable(f"this worker's engine is down: {message}")
    error.worker_fault = True
    return error


class AdapterCopies:
    """Which adapters the engine process holds a copy of, least recently used first, within
    `budget` bytes (the host cache's bound): it gets an adapter's weights before the first
    request that needs them, and is told to forget the oldest beyond the budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self._sizes: OrderedDict[AdapterKey, int] = OrderedDict()
        self._total = 0

    def messages_for(self, adapter: CanonicalAdapter) -> list[tuple[Any, ...]]:
        """The messages that give the engine process `adapter` (none if it has it)."""
        key = adapter.key
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return []
        size = adapter_nbytes(adapter)
        messages: list[tuple[Any, ...]] = [("adapter", adapter)]
        self._sizes[key] = size
        self._total += size
        while self._total > self.budget and len(self._sizes) > 1:
            old, old_size = self._sizes.popitem(last=False)
            self._total -= old_size
            messages.append(("forget", old))
        return messages
