"""One request's state inside the engine, and what the engine streams back for it."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.tokenizer import Tokenizer
from services.gpu_worker.memory.adapter_manager import ResidentAdapter


class FinishReason(enum.Enum):
    LENGTH = "LENGTH"
    STOP = "STOP"
    EOS = "EOS"
    ABORTED = "ABORTED"


@dataclass
class StepOutput:
    """New tokens of one request since its last output; the last one carries the finish."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    error: Exception | None = None  # set when the request failed instead of finishing


# Internal ids: requests are found by these, never by the caller's request_id, which two
# callers may share (it is only echoed back).
_seq_ids = itertools.count(1)


@dataclass
class Sequence:
    request_id: str  # the caller's, echoed on every output
    prompt_ids: list[int]
    options: SamplingOptions
    tokenizer: Tokenizer
    on_output: Callable[[StepOutput], None]
    adapter: CanonicalAdapter | None = None
    max_total_tokens: int = 0  # prompt + tokens to come, capped by the model's context
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the pool, or will be once the launched steps run (< the
    # prompt's: prefilling).
    num_cached: int = 0
    # Row of the engine's slot tables that lists its tokens' K and V slots; -1 until admitted.
    table_row: int = -1
    num_allocated: int = 0  # tokens that have slots
    resident: ResidentAdapter | None = None  # the adapter's weights in the pool, while running
    deadline: float | None = None  # monotonic time after which the caller no longer waits
    seed: int = 0  # the sampler's, set when queued (sampling.request_seed)
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    # Tokens a launched step samples for it that have not been read back yet (0, or 1-2 with
    # overlap scheduling: engine.py); they count in its next token's index and its length.
    tokens_in_flight: int = 0
    # Ended (finished, failed or aborted) on the engine thread: a token of a step launched
    # before it ended is discarded (engine.py, async output processing, overlap scheduling).
    finished: bool = False
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # unique in this process

    def __post_init__(self) -> None:
        self.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.stops = StopStringMatcher(list(self.options.stop))
        self._prompt_tensor: torch.Tensor | None = None

    @property
    def prefilling(self) -> bool:
        """Some of its prompt has not been through the model yet (none of it, before the
        first chunk runs)."""
        return self.num_cached < len(self.prompt_ids)

    @property
    def next_token_index(self) -> int:
        """The index of the token the next launched step samples for it: its tokens, those
        in flight included (the sampler's seed index, sampling.uniforms)."""
        return len(self.output_ids) + self.tokens_in_flight

    def reaches_length(self, generated: int) -> bool:
        """Whether `generated` tokens of its own end it by length: its max_new_tokens, or
        its context (`max_total_tokens`, prompt included)."""
        return (
            generated >= self.options.max_new_tokens
            or len(self.prompt_ids) + generated >= self.max_total_tokens
        )

    def prompt_tokens(self, start: int, n: int) -> torch.Tensor:
        """Prompt tokens start .. start + n - 1 as an int64 CPU tensor (the prompt is
        converted once, so a chunk costs a slice, not a Python loop over its tokens)."""
        if self._prompt_tensor is None:
            self._prompt_tensor = torch.tensor(self.prompt_ids, dtype=torch.long)
        return self._prompt_tensor[start : start + n]

    @property
    def adapter_id(self) -> str:
        return self.adapter.adapter_id if self.adapter else ""

    def output(
        self, token_ids: list[int], text: str, logprobs: list[float], finish: FinishReason | None
    ) -> StepOutput:
        """An output for the client; a finishing one carries usage."""
        out = StepOutput(self.request_id, token_ids, text, logprobs, finish_reason=finish)
        if finish is None:
            return out
        now = time.monotonic()
        out.prompt_tokens = len(self.prompt_ids)
        out.completion_tokens = len(self.output_ids)
        out.queue_time_ms = ((self.scheduled_at or now) - self.arrival) * 1000
        out.time_to_first_token_ms = ((self.first_token_at or now) - self.arrival) * 1000
        return out
