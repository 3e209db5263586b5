"""A sampling profile of one thread, written when it stops: for diagnosis (the GPU worker's
`--profile-to`).

A second thread reads the profiled thread's Python stack every `interval_s`. Sampling, not
cProfile, because cProfile on Python 3.12+ hooks the whole interpreter (one profiler at a
time, every thread's calls mixed into one stack), and because a sample also lands where the
thread waits outside Python (a device sync, a lock, the selector): the report shows where
wall time goes, waiting included. The sampler takes the GIL once per interval, so it perturbs
the service a little; what it shows is where time goes, not how fast the service is."""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType

logger = logging.getLogger(__name__)

TOP = 40  # functions listed per table of the report


class ThreadProfile:
    """Samples the thread that calls `start` until `stop`, then writes `path` (a text report:
    the functions holding the most samples, on top of the stack and anywhere in it) and
    `path` + ".folded" (one line per distinct stack, root first, `;`-joined, then its sample
    count: the input of flame-graph tools)."""

    def __init__(self, path: Path, interval_s: float = 0.002):
        self.path = path
        self.interval_s = interval_s
        self._stacks: Counter[tuple[str, ...]] = Counter()
        self._lines: Counter[str] = Counter()  # the line on top of the stack, file:function:line
        self._stopped = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        """Start sampling the calling thread."""
        target = threading.get_ident()
        self._sampler = threading.Thread(
            target=self._sample, args=(target,), name="thread-profile", daemon=True
        )
        self._sampler.start()

    def stop(self) -> None:
        """Stop sampling and write the report and the folded stacks (from any thread)."""
        self._stopped.set()
        if self._sampler is not None:
            self._sampler.join()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(report(self._stacks, self.interval_s, self._lines))
        folded = "".join(f"{';'.join(s)} {n}\n" for s, n in self._stacks.most_common())
        Path(f"{self.path}.folded").write_text(folded)
        logger.info("profile written to %s (%d samples)", self.path, self._stacks.total())

    def _sample(self, target: int) -> None:
        while not self._stopped.wait(self.interval_s):
            frame = sys._current_frames().get(target)
            if frame is None:  # the thread has ended
                return
            self._stacks[stack_of(frame)] += 1
            self._lines[f"{_name(frame.f_code)}:{frame.f_lineno}"] += 1


def stack_of(frame: FrameType | None) -> tuple[str, ...]:
    """The frames from `frame` down to the thread's root, root first, as file:function."""
    names = []
    while frame is not None:
        names.append(_name(frame.f_code))
        frame = frame.f_back
    return tuple(reversed(names))


def _name(code: CodeType) -> str:
    return f"{Path(code.co_filename).name}:{code.co_name}"


def report(
    stacks: Counter[tuple[str, ...]], interval_s: float, lines_on_top: Counter[str] | None = None
) -> str:
    """Per function: samples with it on top of the stack (self) and anywhere in it
    (inclusive), as counts and shares of all samples; then per line on top of the stack,
    which tells which call of a function the time went to (a C call shows as its line)."""
    total = stacks.total()
    on_top: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    for stack, n in stacks.items():
        if stack:
            on_top[stack[-1]] += n
        for name in set(stack):
            anywhere[name] += n
    lines = [f"{total} samples, one each {interval_s * 1e3:g} ms"]
    tables = [
        ("function (on top of the stack)", on_top),
        ("function (anywhere in the stack)", anywhere),
        ("line (on top of the stack)", lines_on_top or Counter()),
    ]
    for title, counts in tables:
        lines += ["", f"{'samples':>8} {'share':>6}  {title}"]
        lines += [f"{n:8d} {n / max(total, 1):6.1%}  {f}" for f, n in counts.most_common(TOP)]
    return "\n".join(lines) + "\n"
