"""The engine thread: owns the device, takes requests and aborts through a thread-safe inbox."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from services.common.errors import (
    Internal,
    ResourceExhausted,
    ServiceError,
    WorkerFault,
    status_details,
)
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sequence import FinishReason, Sequence

logger = logging.getLogger(__name__)

Command = Callable[[], None]


class EngineLoop:
    """Runs `engine.step()` on its own thread whenever there is work, and sleeps otherwise."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet in the scheduler
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises InvalidArgument or ResourceExhausted at once when refused."""
        self.engine.check(seq)
        with self._lock:
            waiting = len(self.engine.scheduler.waiting) + self._pending
            if waiting >= self.engine.config.max_waiting:
                raise ResourceExhausted(
                    f"waiting queue full ({self.engine.config.max_waiting}); retry later"
                )
            self._pending += 1
        self._inbox.put(lambda: self._add(seq))

    def abort(self, seq: Sequence) -> None:
        """End `seq` (by its internal id: callers' request ids may collide)."""
        seq_id = seq.seq_id
        self._inbox.put(lambda: self._abort(seq_id))

    def _add(self, seq: Sequence) -> None:
        with self._lock:
            self._pending -= 1
        try:
            self.engine.add(seq)
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
        while not self._stopping.is_set():
            try:
                block = not self.engine.has_work()
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

    def _step(self) -> None:
        """One engine step; if it raises outside the pass (which fails its own requests),
        every request here fails rather than the thread dying and leaving them hanging."""
        try:
            self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed outside the forward pass")
            fault = WorkerFault(status_details(f"engine failed: {type(exc).__name__}: {exc}"))
            scheduler = self.engine.scheduler
            for seq in (*scheduler.running, *scheduler.waiting):
                scheduler.remove(seq)
                out = seq.output([], "", [], FinishReason.ABORTED)
                out.error = fault
                seq.on_output(out)
