"""The engine thread: owns the device, takes requests and aborts through a thread-safe inbox,
and publishes the engine's stats (engine_stats.py) for other threads to read, with the count
and the time of the steps it ran."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from kernels.compile_watch import compile_watch
from services.common.errors import (
    Internal,
    ResourceExhausted,
    ServiceError,
    WorkerFault,
    status_details,
)
from services.common.thread_profile import ThreadProfile
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_stats import EngineStats, StepCounts
from services.gpu_worker.engine.sequence import FinishReason, Sequence

logger = logging.getLogger(__name__)

Command = Callable[[], None]


class EngineLoop:
    """Runs `engine.step()` on its own thread whenever there is work, and sleeps otherwise."""

    def __init__(
        self,
        engine: Engine,
        profile: ThreadProfile | None = None,
        after_publish: Command | None = None,
        receive: Callable[[float], None] | None = None,
    ):
        """For an engine process (serving/engine_child.py), two hooks that run on the engine
        thread: `after_publish` after each step (or idle moment), once its stats are
        published, sends its outputs on; `receive(timeout)` before each step waits up to
        `timeout` seconds for requests from outside and hands them to `submit`, `abort` or
        `call`. Taking them on the engine thread, between steps, spares another thread
        waiting for the GIL (up to the interpreter's 5 ms switch interval per wake-up) while
        this one runs Python."""
        self.engine = engine
        self._profile = profile  # of the engine thread, when asked for (diagnosis)
        self._after_publish = after_publish
        self._receive = receive
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # The engine thread has not started: this first snapshot may be made here.
        self._stats = engine.stats()
        self._unpublished = 0  # submitted and not yet counted by a published snapshot
        self._added = 0  # added by the engine thread since its last snapshot
        self.added_total = 0  # added by the engine thread ever (read on that thread)
        self._step_counts = StepCounts()  # the engine thread's alone
        self._compiles = compile_watch()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def request_stop(self) -> None:
        """Stop after the current step; callable on the engine thread itself."""
        self._stopping.set()

    def join(self) -> None:
        """Wait until the engine thread has stopped."""
        self._thread.join()

    @property
    def stats(self) -> EngineStats:
        """The engine's numbers as of its last step (or idle moment); safe from any thread."""
        return self._stats

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises InvalidArgument or ResourceExhausted at once when refused.

        The waiting-queue bound counts the last snapshot's waiting requests and those
        submitted since: never fewer than wait in truth, so it is never overrun."""
        self.engine.check(seq)
        bound = self.engine.config.max_waiting
        with self._lock:
            if self._stats.waiting_requests + self._unpublished >= bound:
                raise ResourceExhausted(f"waiting queue full ({bound}); retry later")
            self._unpublished += 1
        self._inbox.put(lambda: self._add(seq))

    def abort(self, seq: Sequence) -> None:
        """End `seq` (by its internal id: callers' request ids may collide)."""
        seq_id = seq.seq_id
        self._inbox.put(lambda: self._abort(seq_id))

    def call(self, command: Command) -> None:
        """Run `command` on the engine thread before its next step."""
        self._inbox.put(command)

    def _add(self, seq: Sequence) -> None:
        self._added += 1
        self.added_total += 1
        try:
            self.engine.enqueue(seq)  # submit has checked it
        except Exception as exc:  # whatever it is, it must reach this request's caller
            if not isinstance(exc, ServiceError):
                logger.exception("adding a request failed")
            error = exc if isinstance(exc, ServiceError) else Internal("the request was refused")
            out = seq.output([], "", [], FinishReason.ABORTED)
            out.error = error
            seq.on_output(out)

    def _abort(self, seq_id: int) -> None:
        self.engine.abort(seq_id)

    def _run(self) -> None:
        if self._profile is not None:
            self._profile.start()
        try:
            self._serve()
        finally:
            if self._profile is not None:
                self._profile.stop()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                block = not self.engine.has_work()
                if self._receive is not None:  # what it takes in lands in the inbox
                    self._receive(0.5 if block else 0.0)
                    block = False
                command = self._inbox.get(block=block, timeout=0.5 if block else None)
                command()
                while True:  # everything that arrived meanwhile joins this step
                    self._inbox.get_nowait()()
            except queue.Empty:
                pass
            except Exception:
                logger.exception("engine command failed")
            if self.engine.has_work() and not self._stopping.is_set():
                self._step()
            self._publish()
            if self._after_publish is not None:
                try:
                    self._after_publish()
                except Exception:
                    logger.exception("handing the step's outputs on failed")

    def _publish(self) -> None:
        """Make the engine's stats readable by other threads."""
        try:
            # A copy: the engine thread goes on counting into its own.
            stats = replace(self.engine.stats(), steps=replace(self._step_counts))
        except Exception:  # a stale snapshot beats a dead engine thread
            logger.exception("engine stats failed")
            return
        with self._lock:
            self._stats = stats
            self._unpublished -= self._added
        self._added = 0

    def _step(self) -> None:
        """One engine step; if it raises outside the pass (which fails its own requests),
        every request here fails rather than the thread dying and leaving them hanging."""
        try:
            began, waited = time.perf_counter(), self.engine.device_wait_seconds
            cpu, compiled = time.thread_time(), self._compiles.total
            result = self.engine.step()
            seconds = time.perf_counter() - began
            self._step_counts.add(
                result,
                seconds,
                self.engine.device_wait_seconds - waited,
                time.thread_time() - cpu,
                self._compiles.total - compiled,
            )
        except Exception as exc:
            logger.exception("engine step failed outside the forward pass")
            fault = WorkerFault(status_details(f"engine failed: {type(exc).__name__}: {exc}"))
            try:  # the last step's outputs, still waiting, go out before the failures
                self.engine.flush()
            except Exception:
                logger.exception("delivering the last step's outputs failed")
            scheduler = self.engine.scheduler
            for seq in (*scheduler.running, *scheduler.waiting):
                scheduler.remove(seq)
                out = seq.output([], "", [], FinishReason.ABORTED)
                out.error = fault
                seq.on_output(out)
