"""The demo's cache: a folder appears whole or not at all, a changed recipe trains anew, and
the model folder's tokenizer.json gives the ids the model was trained on (those of the
worker's ByteTokenizer, an independent implementation of the same byte vocabulary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo import artifacts, behaviours
from demo.show import show_answers
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer


def test_an_interrupted_write_leaves_no_folder_and_the_next_one_completes(tmp_path: Path):
    final = tmp_path / "cache" / "model"

    def interrupted(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # Ctrl-C halfway through the weights

    with pytest.raises(KeyboardInterrupt):
        artifacts.write_atomically(final, interrupted)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temporary folder left behind either

    def complete(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    artifacts.write_atomically(final, complete)
    assert (final / "config.json").read_text() == "{}"


def test_a_folder_another_run_wrote_first_is_kept(tmp_path: Path):
    final = tmp_path / "model"

    def racing(folder: Path) -> None:
        (folder / "weights").write_text("ours")
        final.mkdir()  # another run renames its complete folder into place meanwhile
        (final / "weights").write_text("theirs")

    artifacts.write_atomically(final, racing)
    assert (final / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_cache_key_follows_the_behaviours(monkeypatch):
    before = artifacts.recipe_key()
    changed = {**behaviours.ADAPTER_BEHAVIOURS, "pirate": lambda text: f"Ahoy, {text}!"}
    monkeypatch.setattr(artifacts, "ADAPTER_BEHAVIOURS", changed)
    assert artifacts.recipe_key() != before


@pytest.mark.parametrize(
    "text", ["hello world\n", "Arr, I like tea, matey!", "Ünïcödé ✓ 日本", "", "  two  spaces\t"]
)
def test_the_model_folder_tokenizer_is_the_byte_vocabulary(tmp_path: Path, text: str):
    artifacts.write_byte_tokenizer(tmp_path)
    ours, reference = HFTokenizer(tmp_path), ByteTokenizer()
    assert ours.vocab_size == reference.vocab_size
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(reference.encode(text)) == text


async def test_an_answer_not_as_trained_is_marked(capsys):
    async def wrong_front(adapter: str, prompt: str):
        yield "hello"
        yield " there"

    answers = await show_answers({"fake": wrong_front}, texts=["hello world"])
    assert [a.as_trained for a in answers] == [False] * (1 + len(behaviours.ADAPTER_BEHAVIOURS))
    out = capsys.readouterr().out
    assert "hello there" in out and "✗ trained to say 'HELLO WORLD'" in out
