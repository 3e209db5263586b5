"""`python -m services.router [--flags]`: run one router replica until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.common.config import exit_on_startup_error, load_config
from services.common.logging import setup_logging
from services.router.config import RouterConfig
from services.router.server import serve

PROG = "python -m services.router"


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_startup_error(PROG):
        config = load_config(RouterConfig, argv, prog=PROG)
        config.check()
        setup_logging(config.log_level, config.log_format)
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
