"""Streaming text never splits a UTF-8 character and never leaks a stop string."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.gpu_worker.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.gpu_worker.engine.tokenizer import ByteTokenizer


def _stream(text: str) -> list[str]:
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in tokenizer.encode(text)[1:]]
    return [*deltas, detok.flush()]


def test_multibyte_characters_arrive_whole():
    deltas = _stream("héllo 世界 🙂")
    assert "".join(deltas) == "héllo 世界 🙂"
    assert "\ufffd" not in "".join(deltas)
    assert "世" in deltas and "🙂" in deltas  # each came out in one piece


@given(st.text(max_size=40))
def test_stream_concatenates_to_the_text(text: str):
    deltas = _stream(text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_invalid_bytes_become_replacement_characters_at_flush():
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(0xE4 + 3) == ""  # first byte of a 3-byte character: held
    assert detok.flush() == "\ufffd"


def test_stop_string_split_across_deltas_is_caught_and_held_text_released():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcE") == ("abc", False)  # "E" may start the stop string
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.feed("yyEN") == ("yy", False)
    assert matcher.feed("Dtail") == ("", True)


@given(st.text(alphabet="abc", max_size=30), st.lists(st.integers(1, 5), max_size=30))
def test_stop_matcher_output_is_text_before_first_stop(text: str, cuts: list[int]):
    stops = ["ab", "cca"]
    matcher = StopStringMatcher(stops)
    out, stopped, pos = "", False, 0
    for cut in [*cuts, len(text)]:
        piece, pos = text[pos : pos + cut], pos + cut
        released, stopped = matcher.feed(piece)
        out += released
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert stopped == bool(hits) or pos < len(text)
    if stopped:
        assert out == text[: min(hits)]
    elif pos >= len(text):
        assert out == text
