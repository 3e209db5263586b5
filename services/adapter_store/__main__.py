"""`python -m services.adapter_store`: run the store until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from services.adapter_store.config import AdapterStoreConfig
from services.adapter_store.server import start_store_server
from services.common.config import load_config
from services.common.grpc_server import wait_for_signal_then
from services.common.logging import setup_logging

logger = logging.getLogger(__name__)


async def serve(config: AdapterStoreConfig) -> None:
    server = await start_store_server(config)
    await wait_for_signal_then(server.stop)


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(AdapterStoreConfig, argv)
    setup_logging(config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
