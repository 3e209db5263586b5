"""`python -m services.gpu_worker [--flags]`: run one GPU worker."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from services.common.config import exit_on_startup_error, load_config
from services.common.logging import setup_logging
from services.gpu_worker.serving.config import WorkerConfig

PROG = "python -m services.gpu_worker"


def main(argv: Sequence[str] | None = None) -> None:
    with exit_on_startup_error(PROG):
        config = load_config(WorkerConfig, argv, prog=PROG)
        config.check()
        setup_logging(config.log_level, config.log_format)
        # Imported once the settings are checked: torch and the engine take seconds to load.
        from services.gpu_worker.serving.engine_process import EngineProcessFailed
        from services.gpu_worker.serving.server import serve

        try:
            asyncio.run(serve(config))
        except EngineProcessFailed as exc:  # the engine process has logged its traceback
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
