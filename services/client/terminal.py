"""Showing generated text on a terminal (the client's command line, the demo)."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with control characters shown as '·': a model can emit any byte, and a raw
    escape sequence would garble the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else "·" for c in text)
