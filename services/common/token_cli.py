"""Operators' command line for signing keys and bearer tokens (services.common.tokens).

    python -m services.common.token_cli new-key > auth.key
    python -m services.common.token_cli mint --key-file auth.key --subject alice \\
        --scopes generate[,adapters:write] [--ttl 30d]
    python -m services.common.token_cli inspect --key-file auth.key < token.txt

`mint` prints the token alone on stdout (to be redirected into a file or a secret store);
`inspect` reads a token on stdin and prints its subject, scopes and expiry, or why it is
refused. Exit status 0 on success, 1 on a refusal, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence

from services.common.tokens import SCOPES, SigningKeys, TokenError, parse_duration

PROG = "python -m services.common.token_cli"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help="print a new random signing key")
    mint = commands.add_parser("mint", help="print a token signed with the key file's first key")
    mint.add_argument("--key-file", required=True, help="the services' --auth-key-file")
    mint.add_argument("--subject", required=True, help="who the token is for (logged on refusal)")
    mint.add_argument("--scopes", required=True, help=f"comma-separated, of {', '.join(SCOPES)}")
    mint.add_argument("--ttl", default="30d", help="lifetime: 90s, 15m, 12h, 30d; 0 = never")
    inspect = commands.add_parser("inspect", help="check a token read from stdin")
    inspect.add_argument("--key-file", required=True)
    return parser


def _keys(path: str) -> SigningKeys:
    try:
        return SigningKeys.from_file(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{PROG}: error: --key-file {path}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "new-key":
        print(secrets.token_urlsafe(48))
        return 0
    keys = _keys(args.key_file)
    if args.command == "mint":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        try:
            print(keys.mint(args.subject, scopes, parse_duration(args.ttl)))
        except ValueError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        claims = keys.verify(sys.stdin.read().strip())
    except TokenError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    expiry = "never" if claims.expires_at is None else time.ctime(claims.expires_at)
    print(f"subject {claims.subject}, scopes {','.join(sorted(claims.scopes))}, expires {expiry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
