"""Tokenizers the worker owns: a model folder's `tokenizer.json`, or bytes for dummy models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerImpl


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; without `add_special_tokens` no BOS is added (a chat template places
        its own)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens decode to nothing, incomplete UTF-8 to U+FFFD."""
        ...


class ByteTokenizer:
    """Llama-style byte vocabulary: 0 <pad>, 1 <s>, 2 </s>, then the 256 bytes at 3..258.

    Ids past the byte range (dummy models with a larger vocabulary) decode to nothing.
    """

    OFFSET = 3
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int = 259, add_bos: bool = True):
        self.vocab_size = vocab_size
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if self.add_bos and add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library (no transformers needed)."""

    def __init__(self, folder: str | Path):
        # The chat template (engine/chat_template.py) is read from the same folder.
        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        self._tok = HFTokenizerImpl.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self._add_special = bool(config.get("add_bos_token", True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        add = self._add_special and add_special_tokens
        return list(self._tok.encode(text, add_special_tokens=add).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))
