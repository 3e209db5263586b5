"""`make run`: the whole stack on this machine, no Docker, with answers a person can read.

A tiny Llama over bytes is trained on this CPU to echo its prompt, and three LoRA adapters on
top of it to answer each in its own way: `uppercase` (HELLO WORLD), `pirate` (Arr, hello
world, matey!) and `leet` (h3ll0 w0rld). Training runs once, in about a minute on two cores,
and is cached under `.demo/` (git-ignored; delete it to train again).

Then an adapter store (in a temporary folder), one CPU worker serving that model and fetching
adapters from the store, a router and the OpenAI-compatible HTTP front start; the adapters,
saved as PEFT folders, are uploaded through the store's API; and every model answers a few
prompts with greedy decoding, streamed through the router's gRPC API and through the HTTP
front alike, each answer checked against what its model was trained to say. The exit status
is 1 when one was not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from demo.artifacts import DemoModels, default_cache_dir, ensure_models
from demo.show import Front, grpc_front, http_front, show_answers
from demo.stack import running_stack
from demo.training import TrainReport
from services.client import AsyncManyloraClient
from services.common.config import exit_on_startup_error
from services.common.logging import setup_logging

PROG = "python -m demo"


def report_training(name: str, report: TrainReport) -> None:
    outcome = "learned" if report.learned else "NOT learned within the step cap"
    print(
        f"trained {name}: {report.steps} steps in {report.seconds:.1f} s, {outcome} "
        f"({report.held_out_accuracy:.0%} of held-out phrases right)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument("--router-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="where trained models are kept"
    )
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    print(f"models in {args.cache_dir} (trained on this CPU at the first run)")
    # On this thread, outside the event loop, so that Ctrl-C stops training at once.
    models = ensure_models(args.cache_dir, report_training)
    with tempfile.TemporaryDirectory(prefix="manylora-demo-") as tmp:
        return asyncio.run(serve(models, Path(tmp), args.router_port, args.serve))


async def serve(models: DemoModels, tmp: Path, router_port: int, keep_serving: bool) -> int:
    """Start the stack, show every model's answers, and stop (or keep serving); 1 when an
    answer was not as trained."""
    async with running_stack(models, tmp, router_port) as stack:
        print(
            f"store on {stack.store}, worker (CPU) on {stack.worker}, router on {stack.router}, "
            f"OpenAI-compatible API on {stack.openai_url}"
        )
        for info in stack.uploaded:
            print(
                f"uploaded {info.adapter_id} v{info.version} (LoRA rank {info.rank} on "
                f"{len(info.target_modules)} linear layers, sha256 {info.sha256[:12]}...)"
            )
        async with (
            AsyncManyloraClient(stack.router, timeout=120) as client,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        ):
            fronts: dict[str, Front] = {
                "gRPC": grpc_front(client),
                "the OpenAI API": http_front(session, stack.openai_url, stack.base_model),
            }
            answers = await show_answers(fronts)
            wrong = [a for a in answers if not a.as_trained]
            print(f"\n{len(answers) - len(wrong)} of {len(answers)} answers as trained")
            if keep_serving:
                print(
                    f"\nserving; try: python -m services.client $'hello world\\n' "
                    f"--adapter pirate --target {stack.router}\n"
                    f"or: curl {stack.openai_url}/completions -H 'content-type: application/json' "
                    f"""-d '{{"model": "pirate", "prompt": "hello world\\n", "max_tokens": 32, """
                    f""""temperature": 0}}'\n(Ctrl-C stops)"""
                )
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
    return 1 if wrong else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt), exit_on_startup_error(PROG):
        sys.exit(main())
