"""`python -m services.adapter_store`: run the store until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from services.adapter_store.config import AdapterStoreConfig
from services.common.config import exit_on_startup_error, load_config
from services.common.grpc_server import wait_for_signal_then
from services.common.logging import setup_logging

logger = logging.getLogger(__name__)

PROG = "python -m services.adapter_store"


async def serve(config: AdapterStoreConfig) -> None:
    # Imported once the settings are checked: validation needs torch, which takes seconds.
    from services.adapter_store.server import start_store_server

    server = await start_store_server(config)
    await wait_for_signal_then(server.stop)


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_startup_error(PROG):
        config = load_config(AdapterStoreConfig, argv, prog=PROG)
        config.check()
        setup_logging(config.log_level, config.log_format)
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
