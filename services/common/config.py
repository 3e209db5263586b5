"""One dataclass per service, filled from CLI flags, then environment variables, then defaults.

A field `max_num_seqs` is set by `--max-num-seqs` or by `MANYLORA_MAX_NUM_SEQS`; the flag wins.
Lists are comma-separated in both places. Each field's `help` metadata becomes the flag's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

ENV_PREFIX = "MANYLORA_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The type a value is parsed to, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse(text: str, annotation: Any, name: str) -> Any:
    kind, optional = _base_type(annotation)
    if optional and text == "":
        return None
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{name}: expected a boolean (true/false), got {text!r}")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return [item(part.strip()) for part in text.split(",") if part.strip()]
    try:
        return kind(text)
    except ValueError as exc:
        raise ValueError(f"{name}: cannot read {text!r} as {kind.__name__}") from exc


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str | None = None,
) -> T:
    """Build `cls` (a dataclass) from flags, then `MANYLORA_*` variables, then field defaults."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind, _ = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        help_text += f" (env {env_name(field.name)})"
        if kind is bool:
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(field.name), dest=field.name, default=None, help=help_text
            )
    parsed = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(parsed, field.name)
        if isinstance(given, bool):
            values[field.name] = given
        elif given is not None:
            values[field.name] = _parse(given, hints[field.name], flag_name(field.name))
        elif env_name(field.name) in env:
            values[field.name] = _parse(env[env_name(field.name)], hints[field.name], field.name)
    return cls(**values)
