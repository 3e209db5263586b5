"""`python -m services.router [--flags]`: run one router replica until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from services.common.config import exit_on_startup_error, load_config
from services.common.logging import setup_logging
from services.router.config import RouterConfig
from services.router.server import serve

PROG = "python -m services.router"

logger = logging.getLogger(__name__)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop's event loop when uvloop is installed (an optional dependency:
    the `fast` extra), else on asyncio's: the relay's per-message work is mostly event-loop
    callbacks, which uvloop runs in C."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    logger.info("event loop: uvloop %s", uvloop.__version__)
    uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_startup_error(PROG):
        config = load_config(RouterConfig, argv, prog=PROG)
        config.check()
        setup_logging(config.log_level, config.log_format)
        run(serve(config))


if __name__ == "__main__":
    main()
