"""The security flags of every command-line client (services.client, the store's CLI, the
health check): a bearer token and TLS, each also an environment variable.

The token is read from a file (`--token-file`) or from MANYLORA_TOKEN, never from a flag's
value: a command line is visible to every user of the machine (`ps`).
"""

from __future__ import annotations

import argparse
import os

from services.common.channels import ChannelSecurity, StaticToken, token_from_file
from services.common.tls import ClientTls, TlsFileError

TOKEN_ENV = "MANYLORA_TOKEN"
TOKEN_FILE_ENV = "MANYLORA_TOKEN_FILE"


class ClientFlagError(ValueError):
    """A security flag that cannot be used; the message names it."""


def add_security_flags(parser: argparse.ArgumentParser, token: bool = True) -> None:
    if token:
        parser.add_argument(
            "--token-file",
            default=os.environ.get(TOKEN_FILE_ENV, ""),
            help=f"file holding a bearer token (env {TOKEN_FILE_ENV}; or the token itself in "
            f"{TOKEN_ENV})",
        )
    flags = {
        "--tls-ca-file": "PEM CA that signs the server's certificate; given = TLS",
        "--tls-cert-file": "PEM client certificate, for servers that require mutual TLS",
        "--tls-key-file": "PEM private key of --tls-cert-file",
    }
    for flag, help_text in flags.items():
        env = "MANYLORA_" + flag[2:].replace("-", "_").upper()
        parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{help_text} (env {env})")


def security_from_args(args: argparse.Namespace) -> ChannelSecurity:
    """The channel security the flags ask for; `ClientFlagError` naming a flag that cannot work."""
    token = None
    token_file = getattr(args, "token_file", "")
    if token_file:
        try:
            token = token_from_file(token_file)
        except (OSError, ValueError) as exc:
            raise ClientFlagError(f"--token-file {token_file}: {exc}") from None
    elif os.environ.get(TOKEN_ENV, "").strip() and hasattr(args, "token_file"):
        token = StaticToken(os.environ[TOKEN_ENV])
    tls = None
    if args.tls_ca_file or args.tls_cert_file or args.tls_key_file:
        tls = ClientTls(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        try:
            tls.check()
        except TlsFileError as exc:
            raise ClientFlagError(f"TLS: {exc}") from None
    return ChannelSecurity(tls, token)
