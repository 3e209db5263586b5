"""One dataclass per service, filled from CLI flags, then environment variables, then defaults.

A field `max_num_seqs` is set by `--max-num-seqs` or by `MANYLORA_MAX_NUM_SEQS`; the flag wins.
Lists are comma-separated in both places. Each field's `help` metadata becomes the flag's help,
followed by its default and its variable; `min`/`max` metadata bound a number, `choices` a word.

A setting that cannot work is a `ConfigError` naming the flag and its variable; a program's
`main` runs inside `exit_on_startup_error`, which turns it (and an unknown flag) into one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from services.common.base_model import DUMMY_PRESETS, load_hf_config

ENV_PREFIX = "MANYLORA_"
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def host_field() -> Any:
    """`--host`, the same in every service."""
    return dataclasses.field(default="127.0.0.1", metadata={"help": "address to bind"})


def port_field(default: int) -> Any:
    """`--port` of a gRPC server."""
    return dataclasses.field(
        default=default,
        metadata={"help": "gRPC port (0 picks a free one)", "min": 0, "max": 65535},
    )


def metrics_port_field() -> Any:
    """`--metrics-port`, the same in every service."""
    return dataclasses.field(
        default=0,
        metadata={
            "help": "port of the Prometheus /metrics endpoint; 0 = off",
            "min": 0,
            "max": 65535,
        },
    )


def log_level_field() -> Any:
    """`--log-level`, the same in every service."""
    return dataclasses.field(
        default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR", "choices": LOG_LEVELS}
    )


def log_format_field() -> Any:
    """`--log-format`, the same in every service."""
    return dataclasses.field(
        default="text",
        metadata={
            "help": "text (for people) or json (one object per line, for log pipelines)",
            "choices": ("text", "json"),
        },
    )


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class UsageError(ValueError):
    """The command line itself is wrong (an unknown flag, a flag without its value)."""


class ConfigError(ValueError):
    """A setting that cannot work, said in one line that names its flag and variable."""

    def __init__(self, field_name: str, problem: str):
        self.field_name = field_name
        super().__init__(f"{flag_name(field_name)} ({env_name(field_name)}): {problem}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


@contextmanager
def exit_on_startup_error(prog: str) -> Iterator[None]:
    """For a program's `main`: a bad setting becomes one line on stderr and exit status 2."""
    try:
        yield
    except (ConfigError, UsageError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The type a value is parsed to, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse(text: str, annotation: Any, field_name: str) -> Any:
    kind, optional = _base_type(annotation)
    if optional and text == "":
        return None
    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(field_name, f"expected a boolean (true/false), got {text!r}")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return [item(part.strip()) for part in text.split(",") if part.strip()]
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(field_name, f"cannot read {text!r} as {kind.__name__}") from None


def _check_bounds(field: dataclasses.Field[Any], value: Any) -> None:
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if low is not None and value < low:
        raise ConfigError(field.name, f"{value!r} is below the minimum {low!r}")
    if high is not None and value > high:
        raise ConfigError(field.name, f"{value!r} is above the maximum {high!r}")
    choices = field.metadata.get("choices")
    if choices is not None and str(value).upper() not in {str(c).upper() for c in choices}:
        raise ConfigError(field.name, f"{value!r} is not one of {', '.join(choices)}")


def _default_text(field: dataclasses.Field[Any], is_bool: bool) -> str:
    if field.default is not dataclasses.MISSING:
        value: Any = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if is_bool:
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "empty" if value == "" else str(value)


def load_config(
    cls: type[T],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """Build `cls` (a dataclass) from flags, then `MANYLORA_*` variables, then field defaults.

    Raises `ConfigError` for a value that cannot be read or is out of bounds, `UsageError` for
    an unknown flag; `--help` prints and exits."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    parser = _Parser(prog=prog, description=description or cls.__doc__)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for field in fields:
        kind, _ = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        help_text += f" (default: {_default_text(field, kind is bool)}; env {env_name(field.name)})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
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
    for field in fields:
        given = getattr(parsed, field.name)
        if isinstance(given, bool):
            values[field.name] = given
        elif given is not None:
            values[field.name] = _parse(given, hints[field.name], field.name)
        elif env_name(field.name) in env:
            values[field.name] = _parse(env[env_name(field.name)], hints[field.name], field.name)
        else:
            continue
        _check_bounds(field, values[field.name])
    return cls(**values)


def check_model_setting(field_name: str, model: str, need_weights: bool = False) -> None:
    """`model` must be a dummy preset or a local Hugging Face folder with a readable
    `config.json`; with `need_weights`, also its `*.safetensors` and `tokenizer.json`."""
    if model in DUMMY_PRESETS:
        return
    folder = Path(model)
    if not folder.is_dir():
        raise ConfigError(
            field_name,
            f"{model!r} is neither a dummy preset ({', '.join(DUMMY_PRESETS)}) nor a folder",
        )
    try:
        load_hf_config(model)
    except (OSError, ValueError) as exc:
        raise ConfigError(field_name, f"{model}: cannot read config.json ({exc})") from None
    if not need_weights:
        return
    has_weights = (folder / "model.safetensors.index.json").is_file() or any(
        folder.glob("*.safetensors")
    )
    if not has_weights:
        raise ConfigError(
            field_name,
            f"{model}: no *.safetensors weights there (for random weights add --dummy)",
        )
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(field_name, f"{model}: no tokenizer.json there")
