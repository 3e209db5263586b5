"""Tokens sampled and appended whose text work waits: async output processing.

When a step's tokens reach the host, the engine appends each to its request at once and
decides what the token alone decides (EOS, a stop token id, the length), which is all the
next step's batch needs. The rest, detokenizing, matching stop strings, building the
`StepOutput` and calling the request's callback (about 20 µs a token on the engine thread),
is kept here as a `PendingToken` and done during the next step, after its forward pass and
sampling are launched, while the device runs them (engine.py, `Engine.step`).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput


@dataclass(frozen=True)
class PendingToken:
    """One request's token of a step, appended, its output not built yet."""

    seq: Sequence
    token: int
    logprob: float | None
    finish: FinishReason | None  # what the token alone decided (EOS, stop token id, length)


def token_output(item: PendingToken) -> StepOutput:
    """The token's output: its text (detokenized, stop strings held back or matched) and its
    finish, STOP when a stop string ends the text here (whatever the token decided)."""
    seq, finish = item.seq, item.finish
    text, stopped = seq.stops.feed(seq.detokenizer.push(item.token))
    if stopped:
        finish = FinishReason.STOP
    elif finish is not None:
        tail, stopped = seq.stops.feed(seq.detokenizer.flush())
        text += tail if stopped else tail + seq.stops.flush()
    logprobs = [item.logprob] if item.logprob is not None else []
    return seq.output([item.token], text, logprobs, finish)


class PendingTokens:
    """The tokens of one step whose outputs are not built yet, at most one per request
    (by its internal id), in the order they were sampled."""

    def __init__(self) -> None:
        self._items: dict[int, PendingToken] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: PendingToken) -> None:
        if item.seq.seq_id in self._items:  # its previous token would be lost
            raise RuntimeError(f"request {item.seq.request_id} has a pending token already")
        self._items[item.seq.seq_id] = item

    def take(self, seq_id: int) -> PendingToken | None:
        """The request's pending token, no longer pending; None when it has none."""
        return self._items.pop(seq_id, None)

    def take_oldest(self) -> PendingToken | None:
        """The token pending longest, no longer pending; None when none is. (One at a time:
        if delivering one raises, the others stay pending, for the next flush.)"""
        for seq_id in self._items:
            return self._items.pop(seq_id)
        return None
