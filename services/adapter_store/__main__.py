"""`python -m services.adapter_store`: run the store until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import start_store_server
from services.common.config import load_config
from services.common.logging import setup_logging

logger = logging.getLogger(__name__)


async def serve(config: AdapterStoreConfig) -> None:
    server = await start_store_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping")
    await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(AdapterStoreConfig, argv)
    setup_logging(config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
