from __future__ import annotations

import pytest

from demo.artifacts import DemoModels, default_cache_dir, ensure_models


@pytest.fixture(scope="session")
def demo_models() -> DemoModels:
    """The demo's trained model and adapters, from the cache `make run` uses (`.demo/`, or
    $MANYLORA_DEMO_CACHE): trained once per checkout, reused by every later run."""
    return ensure_models(default_cache_dir())
