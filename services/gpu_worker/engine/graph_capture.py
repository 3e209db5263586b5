"""A quiet time for capturing CUDA graphs.

torch's pinned-memory allocator records an event on the stream a pinned buffer was copied on
when the buffer is freed, and queries those events when it hands out the next one. If Python's
cyclic garbage collector frees such a buffer (an engine dropped earlier, a step's host tensors)
while a graph is being captured, that event call is an operation the capture forbids, and the
capture fails with "operation failed due to a previous error during capture". torch collects
garbage before a capture only when asked to (`force_cudagraph_gc`), so the engine does it."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def no_collection_during_capture() -> Iterator[None]:
    """Collect garbage and let the device finish, then keep the collector off until the block
    ends (reference-counted frees still run: only cycles wait)."""
    gc.collect()
    torch.cuda.synchronize()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
