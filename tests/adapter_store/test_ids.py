"""The one adapter-id rule (services/common/ids.py) that the store, its CLI and the router use."""

from __future__ import annotations

import pytest

from services.common.ids import MAX_ADAPTER_ID_LENGTH, adapter_id_problem, is_valid_adapter_id


@pytest.mark.parametrize(
    "adapter_id", ["a", "A-1_b.c", "0", "_x", "-x", "x.", "x" * MAX_ADAPTER_ID_LENGTH]
)
def test_valid_ids(adapter_id: str) -> None:
    assert is_valid_adapter_id(adapter_id)
    assert adapter_id_problem(adapter_id) is None


@pytest.mark.parametrize(
    "adapter_id",
    [
        "a\n",
        "a\r",
        "\na",
        "a\x00",
        "a b",
        "é",
        "\u0430",
        "\uff41",
        "a\u200b",
        "",
        "x" * (MAX_ADAPTER_ID_LENGTH + 1),
        ".",
        "..",
        ".x",
        "../x",
        "a/b",
        "a\\b",
        "a:b",
        "a*",
    ],
)
def test_invalid_ids(adapter_id: str) -> None:
    assert not is_valid_adapter_id(adapter_id)
    problem = adapter_id_problem(adapter_id)
    assert problem is not None and problem.startswith("adapter_id: ")
    assert "\n" not in problem  # one line, whatever the id holds


def test_a_huge_id_is_not_echoed_whole() -> None:
    problem = adapter_id_problem("y" * 10_000)
    assert problem is not None and len(problem) < 250 and "10000 characters" in problem
