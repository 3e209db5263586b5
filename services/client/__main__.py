"""Stream one completion from a router to the terminal.

    python -m services.client "Once upon a time" --adapter my-adapter --target 127.0.0.1:50050

Where the router requires a token: --token-file FILE or MANYLORA_TOKEN (scope generate);
with TLS: --tls-ca-file (and --tls-cert-file, --tls-key-file for mutual TLS).
The text goes to stdout as it arrives; the finish reason and timings go to stderr. Exit
status 0 on success, 1 when the call failed (its status code and message are printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from services.client.messages import Chunk, ManyloraError
from services.client.sync_client import ManyloraClient
from services.client.terminal import printable
from services.common.client_flags import (
    ClientFlagError,
    add_security_flags,
    security_from_args,
)

DEFAULT_TARGET = os.environ.get("MANYLORA_ROUTER_TARGET", "127.0.0.1:50050")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.client", description=__doc__)
    parser.add_argument("prompt", nargs="?", help="prompt text")
    parser.add_argument(
        "--adapter", default="", help="adapter id (id@N pins version N); empty = the base model"
    )
    parser.add_argument(
        "--adapter-version", type=int, default=0, help="adapter version; 0 = the newest"
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="router host:port (env MANYLORA_ROUTER_TARGET)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument(
        "--list-adapters", action="store_true", help="list the adapters instead of generating"
    )
    add_security_flags(parser)
    return parser


def _summary(last: Chunk) -> str:
    usage = last.usage
    if usage is None:
        return ""
    version = f" (adapter v{last.adapter_version})" if last.adapter_version else ""
    return (
        f"[{last.request_id}]{version} finish {last.finish_reason}: {usage.prompt_tokens} prompt + "
        f"{usage.completion_tokens} generated tokens, first token after "
        f"{usage.time_to_first_token_ms:.1f} ms"
    )


def _generate(client: ManyloraClient, args: argparse.Namespace) -> None:
    last: Chunk | None = None
    for chunk in client.generate(
        args.prompt,
        adapter=args.adapter,
        adapter_version=args.adapter_version,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    ):
        sys.stdout.write(printable(chunk.text))
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None:
        print(_summary(last), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.list_adapters and not args.prompt:
        parser.error("a prompt is required (or --list-adapters)")
    try:
        security = security_from_args(args)
    except ClientFlagError as exc:
        parser.error(str(exc))
    with ManyloraClient(
        args.target, timeout=args.timeout, token=security.token, tls=security.tls
    ) as client:
        try:
            if args.list_adapters:
                for info in client.list_adapters():
                    print(f"{info.adapter_id} v{info.version}: rank {info.rank}")
            else:
                _generate(client, args)
        except ManyloraError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)  # leaving the stream cancels the request
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
