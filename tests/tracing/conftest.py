from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, stack_at


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async for running in stack_at(tmp_path):
        yield running
