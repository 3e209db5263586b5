"""`python -m services.gpu_worker [--flags]`: run one GPU worker."""

from __future__ import annotations

import asyncio

from services.common.config import load_config
from services.common.logging import setup_logging
from services.gpu_worker.config import WorkerConfig
from services.gpu_worker.server import serve


def main() -> None:
    config = load_config(WorkerConfig)
    setup_logging(config.log_level)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
