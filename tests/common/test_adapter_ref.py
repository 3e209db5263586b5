"""`id@N` and `adapter_version`: which version a request names, and the conflicts refused."""

from __future__ import annotations

import pytest

from services.common.adapter_ref import parse_adapter_ref
from services.common.errors import InvalidArgument


@pytest.mark.parametrize(
    ("adapter_id", "version", "expected"),
    [
        ("plain", 0, ("plain", 0)),
        ("plain", 3, ("plain", 3)),
        ("my.ad-1@4", 0, ("my.ad-1", 4)),
        ("my.ad-1@4", 4, ("my.ad-1", 4)),  # both, agreeing
        ("", 0, ("", 0)),
    ],
)
def test_parses(adapter_id: str, version: int, expected: tuple[str, int]) -> None:
    assert parse_adapter_ref(adapter_id, version) == expected


@pytest.mark.parametrize(
    ("adapter_id", "version", "match"),
    [
        ("ad@4", 5, "conflicts"),
        ("ad@0", 0, "N >= 1"),
        ("ad@", 0, "N >= 1"),
        ("@3", 0, "N >= 1"),
        ("ad@x", 0, "N >= 1"),
        ("ad@-1", 0, "N >= 1"),
    ],
)
def test_refuses(adapter_id: str, version: int, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_adapter_ref(adapter_id, version)
