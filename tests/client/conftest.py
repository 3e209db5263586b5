from __future__ import annotations

from tests.router.conftest import start_fakes, start_router_for

__all__ = ["start_fakes", "start_router_for"]
