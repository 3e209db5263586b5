"""A cProfile of one thread, written when it stops: for diagnosis (the GPU worker's
`--profile-to`). Profiling costs host time on every Python call, so what it shows is where
time goes, not how fast the service is."""

from __future__ import annotations

import cProfile
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class ThreadProfile:
    """A cProfile of the thread that calls `start` (cProfile follows one thread), written to
    `path` in pstats format by `stop`, from any thread once the profiled one is done."""

    def __init__(self, path: Path):
        self.path = path
        self._profile = cProfile.Profile()

    def start(self) -> None:
        self._profile.enable()

    def stop(self) -> None:
        """Stop (when called on the profiled thread) and write the statistics."""
        self._profile.disable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profile.dump_stats(self.path)
        logger.info("profile written to %s", self.path)
