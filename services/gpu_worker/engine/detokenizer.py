"""Streaming text: incremental detokenization and stop strings.

Text is released only when it is final: a trailing incomplete UTF-8 character (U+FFFD at the
end of the decoded window) waits for its next byte, and text that could be the start of a
stop string waits until it is known not to be one.
"""

from __future__ import annotations

from services.gpu_worker.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of ids into text deltas (prefix/read offsets, as TGI does).

    Decoding a window that starts a few tokens back keeps tokenizers that merge spaces or
    bytes across tokens correct, without decoding the whole output each step.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is left, even an incomplete character (the stream is over)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back text that may begin one."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        # Text that may be the start of a stop string. Released text never is, so a stop
        # string always lies wholly inside held + new text.
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found). After a stop, the text
        up to the stop string is released and the rest is dropped."""
        if not self._stops:
            return delta, False
        pending = self._held + delta
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return pending[: min(hits)], True
        hold = self._longest_stop_prefix_suffix(pending)
        out, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
