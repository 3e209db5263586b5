"""A benchmark's workload dataclass as command-line flags: one `--field-name` per field, typed
and defaulted as the given instance has it, read back into an instance of the same class."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, TypeVar

W = TypeVar("W")


def add_workload_args(parser: argparse.ArgumentParser, defaults: Any) -> None:
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)


def workload_from_args(args: argparse.Namespace, defaults: W) -> W:
    """An instance of `defaults`' class with each field as parsed."""
    fields = asdict(defaults)  # type: ignore[call-overload]
    return type(defaults)(**{name: getattr(args, name) for name in fields})
