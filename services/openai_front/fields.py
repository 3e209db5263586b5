"""Typed reads of one field of an OpenAI request body, each refusing a wrong value with a 400
that names the field (as OpenAI's `param`). JSON numbers arrive as int or float, and `true`
is an int to Python: every reader says which it takes."""

from __future__ import annotations

import math
from typing import Any

from services.common.validation import excerpt
from services.openai_front.errors import bad_request

Body = dict[str, Any]
MAX_SHOWN_CHARS = 40


def shown(value: Any) -> str:
    """A caller's value quoted briefly in an error message."""
    if isinstance(value, str):
        return excerpt(value)
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(body: Body, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise bad_request(f"{name} must be an integer, got {shown(value)}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must lie in [{low}, {high}], got {value}", name)
    return int(value)


def number(body: Body, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {shown(value)}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must lie in [{low:g}, {high:g}], got {value}", name)
    return float(value)


def boolean(body: Body, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {shown(value)}", name)
    return value


def string(body: Body, name: str) -> str:
    """A required, non-empty string."""
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{name} is required: a non-empty string", name)
    return value


def string_list(body: Body, name: str) -> list[str]:
    """A string or a list of strings (as `stop` is); missing is empty."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise bad_request(f"{name} must be a string or a list of strings", name)


def refuse_unsupported(body: Body, supported: frozenset[str], default_only: dict[str, Any]) -> None:
    """Fields this server does not implement are refused, not silently ignored, so that a
    caller never gets an answer to a question it did not ask. `default_only` ones pass when
    left at the value that changes nothing (or null)."""
    for name, value in body.items():
        if name in supported or value is None:
            continue
        if name in default_only:
            if value == default_only[name]:
                continue
            raise bad_request(
                f"{name}={shown(value)} is not supported here; only "
                f"{default_only[name]!r} (or leaving it out) is",
                name,
            )
        raise bad_request(f"unsupported parameter: {excerpt(name)}", name)
