"""Counts and times Triton's just-in-time compilations in this process.

A kernel compiles on the first launch of each specialization (constexprs, dtypes, and which
integer arguments equal 1 or divide by 16). A compilation inside a served step stalls every
request of the batch for a second or more, so the worker counts them per step (GetStats,
metrics) and logs each with the specialization that caused it.
"""

from __future__ import annotations

import ast
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compiles:
    """Compilations finished, and the seconds they took."""

    count: int = 0
    seconds: float = 0.0

    def __sub__(self, other: Compiles) -> Compiles:
        return Compiles(self.count - other.count, self.seconds - other.seconds)


class CompileWatch:
    """Triton's compile hooks, counting into `total`; `install` it once per process."""

    def __init__(self) -> None:
        self.total = Compiles()
        self.warn = False  # log each compilation as a warning (set once the worker serves)
        self._began = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        try:
            from triton import knobs
        except ImportError:  # torch's CPU build brings no Triton: nothing ever compiles
            return
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, **_: Any) -> bool:
        self._began.at = time.perf_counter()
        return False  # False: go on and compile

    def _after(self, *, key: Any, fn: Any, **_: Any) -> bool:
        began = getattr(self._began, "at", None)
        seconds = 0.0 if began is None else time.perf_counter() - began
        with self._lock:
            self.total = Compiles(self.total.count + 1, self.total.seconds + seconds)
        level = logging.WARNING if self.warn else logging.INFO
        logger.log(level, "compiled kernel %s in %.2f s", describe(fn, key), seconds)
        return False


def describe(fn: Any, key: Any) -> str:
    """`name(arg=type:specialization, ...)` of a compilation: Triton's cache key holds one
    (type, specialization) pair per argument ('D': divisible by 16; a constexpr's value)."""
    try:
        names = fn.jit_function.arg_names
        # Triton 3.6 hands the key over as the text of (specializations, options).
        specs = key[0] if isinstance(key, tuple) else ast.literal_eval(key[: key.index("]") + 1])
        args = (
            f"{n}={t}:{s}" if s not in ("", None) else f"{n}={t}"
            for n, (t, s) in zip(names, specs, strict=True)
        )
        return f"{fn.name}({', '.join(args)})"
    except (AttributeError, IndexError, TypeError, ValueError, SyntaxError):  # another layout
        return f"{getattr(fn, 'name', fn)} {key}"


_watch: CompileWatch | None = None


def compile_watch() -> CompileWatch:
    """The process's watch, installed on first use."""
    global _watch
    if _watch is None:
        _watch = CompileWatch()
        _watch.install()
    return _watch
