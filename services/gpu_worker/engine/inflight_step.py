"""A step whose pass and draw are queued on the device and whose tokens are not read back yet.

The engine launches a step and keeps it here until it waits for its tokens: at once without
overlap scheduling, after launching the next step with it (engine.py). Once a step is
launched the host already knows what the next one needs but the token values: its requests'
K/V will be in the pool (`num_cached` counts them), and each request it samples has one more
token on its way (`tokens_in_flight`, which the token's read-back takes off again), whose value
the next step's decode row takes on the device (`device_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.engine.batch_builder import DeviceTokens
from services.gpu_worker.engine.sampling import PendingSample
from services.gpu_worker.engine.sequence import Sequence


@dataclass(frozen=True)
class StepResult:
    """What one engine step ran through the model."""

    prefill_seqs: int  # requests with a prompt chunk (maybe the whole prompt) in this step
    decode_seqs: int  # requests that decoded one token
    tokens: int  # tokens through the model
    graph: bool  # a CUDA graph replayed the step's decodes (all of a pure decode step)
    prompt_graph: bool = False  # a CUDA graph replayed the step's prompt chunks


@dataclass(frozen=True)
class InflightStep:
    """A launched step: its requests, those it samples, and its draw."""

    ran: list[Sequence]  # in batch order
    sampled: list[Sequence]  # in the draw's row order
    pending: PendingSample | None  # None: prompt chunks only, none ending its prompt
    result: StepResult

    @classmethod
    def launched(
        cls,
        ran: list[Sequence],
        q_lens: list[int],
        sampled: list[Sequence],
        pending: PendingSample | None,
        result: StepResult,
    ) -> InflightStep:
        """The step just queued; its requests now count what it will have done."""
        for seq, n in zip(ran, q_lens, strict=True):
            seq.num_cached += n
        for seq in sampled:
            seq.tokens_in_flight += 1
        return cls(ran, sampled, pending, result)

    @property
    def can_stay_in_flight(self) -> bool:
        """Whether the next step may be launched before its tokens are read back: its draw is
        queued, so its tokens are on the device (or it draws none). A draw that failed to
        launch has tokens only on the host, once `result` samples row by row."""
        return self.pending is None or self.pending.device_tokens is not None

    def device_tokens(self) -> DeviceTokens | None:
        """Its sampled tokens on the device, for the next step's inputs."""
        tokens = self.pending.device_tokens if self.pending is not None else None
        if tokens is None:
            return None
        return DeviceTokens(tokens, {seq.seq_id: row for row, seq in enumerate(self.sampled)})
