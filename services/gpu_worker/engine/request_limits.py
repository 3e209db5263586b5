"""What a request must satisfy whatever the engine's state: checks that need no engine.

The engine checks these first (`Engine.check`); a worker whose engine runs in its own process
(engine_process.py) checks them where the request arrives, so that a bad request is refused
at once with its own error, and leaves the pool's part of the check to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.gpu_worker.engine.sequence import Sequence


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # the context, prompt and output together
    max_rank: int  # the largest adapter rank the pool's slots and the kernels take

    def check(self, seq: Sequence) -> None:
        """InvalidArgument for a request that can never run."""
        prompt_len = len(seq.prompt_ids)
        if prompt_len == 0:
            raise InvalidArgument("prompt is empty")
        bad = [t for t in seq.prompt_ids if t >= self.vocab_size]
        if bad:
            raise InvalidArgument(f"prompt token ids {bad[:5]} outside vocab of {self.vocab_size}")
        if prompt_len >= self.max_model_len:
            raise InvalidArgument(
                f"prompt has {prompt_len} tokens; the model's context is {self.max_model_len}"
            )
        if seq.adapter is not None and seq.adapter.rank > self.max_rank:
            raise InvalidArgument(f"adapter rank {seq.adapter.rank} > max rank {self.max_rank}")
