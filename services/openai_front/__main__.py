"""`python -m services.openai_front [--flags]`: serve the OpenAI API until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from services.common.config import exit_on_startup_error, load_config
from services.common.logging import setup_logging
from services.openai_front.config import OpenAIFrontConfig
from services.openai_front.server import serve

PROG = "python -m services.openai_front"


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_startup_error(PROG):
        config = load_config(OpenAIFrontConfig, argv, prog=PROG)
        config.check()
        setup_logging(config.log_level)
        asyncio.run(serve(config))


if __name__ == "__main__":
    main()
