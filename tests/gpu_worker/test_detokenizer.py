"""Streaming text never splits a UTF-8 character and never leaks a stop string."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from services.gpu_worker.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer


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


def _metaspace_tokenizer(folder: Path) -> tuple[HFTokenizer, Tokenizer]:
    """A Llama-style (SentencePiece) word tokenizer: "▁world" decodes to " world" after a
    word and to "world" at the start of the text, and </s> decodes to nothing."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "▁again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder), tok


def test_a_token_that_decodes_to_nothing_keeps_the_space_of_the_next_word(tmp_path: Path):
    # An </s> mid-stream (ignore_eos) adds no text. The decode window must still reach back
    # past it to a word, or "▁world" would decode as the start of a text, without its space.
    tokenizer, oracle = _metaspace_tokenizer(tmp_path)
    ids = [3, 2, 4, 2, 2, 5]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    text = "".join([*deltas, detok.flush()])
    assert text == oracle.decode(ids, skip_special_tokens=True) == "Hello world again"


def test_without_stop_strings_text_passes_through_and_never_stops():
    for stops in ([], [""]):
        matcher = StopStringMatcher(stops)
        assert matcher.feed("abc") == ("abc", False)
        assert matcher.flush() == ""


def test_after_a_stop_the_rest_is_dropped_and_nothing_is_left_to_flush():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aE") == ("a", False)
    assert matcher.feed("NDtail") == ("", True)
    assert matcher.flush() == ""


def test_flush_releases_held_text_once():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abEN") == ("ab", False)
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""
    assert matcher.feed("xy") == ("xy", False)
