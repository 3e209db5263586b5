"""JSON from untrusted senders, parsed only after its size and nesting depth are checked.

`json.loads` recurses once per nesting level: a document nested 100,000 deep raises
RecursionError (and costs a deep C stack) instead of a clean refusal. Checking the depth first,
in linear time and without recursion, turns that into an ordinary `ValueError`.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

# A JSON string literal, unrolled so that the engine never backtracks more than linearly.
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonBoundsError(ValueError):
    """A JSON text over the size or depth limit, or not valid JSON."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text`, brackets inside strings not counted
    (for invalid JSON, an upper bound)."""
    if text.count("[") + text.count("{") == 0:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING_LITERAL.sub("", text))
    if not brackets:
        return 0
    return max(0, max(accumulate(map(_BRACKET_STEP.__getitem__, brackets))))


def loads_bounded(text: str | bytes, max_bytes: int, max_depth: int) -> Any:
    """`json.loads(text)`, refused with `JsonBoundsError` when `text` is longer than `max_bytes`,
    nested deeper than `max_depth`, or not valid JSON (including numbers Python won't parse)."""
    if len(text) > max_bytes:
        raise JsonBoundsError(f"{len(text)} bytes is over the limit of {max_bytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonBoundsError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JsonBoundsError(f"nested {depth} deep, over the limit of {max_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an over-long integer
        raise JsonBoundsError(f"not valid JSON ({exc})") from exc
