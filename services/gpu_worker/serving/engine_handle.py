"""What the servicer needs of the engine, wherever it runs: an `EngineLoop` (a thread of this
process) or an `EngineProcess` (a process of its own, `--engine-process`)."""

from __future__ import annotations

from typing import Protocol

from services.gpu_worker.engine.engine_stats import EngineStats
from services.gpu_worker.engine.sequence import Sequence


class EngineHandle(Protocol):
    @property
    def stats(self) -> EngineStats:
        """The engine's numbers as of its last report; safe from any thread."""
        ...

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises a ServiceError at once when it is refused."""
        ...

    def abort(self, seq: Sequence) -> None:
        """End a request the caller no longer waits for."""
        ...

    def stop(self) -> None:
        """Stop serving; running requests end with it."""
        ...
