"""Security settings that cannot work stop a service at start with one line naming the flag
(and its variable), exit status 2; the command-line clients send tokens from a file or
MANYLORA_TOKEN."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from services.adapter_store import cli as store_cli
from services.adapter_store.config import AdapterStoreConfig
from services.client import __main__ as client_cli
from services.common.config import ConfigError, load_config
from services.router import __main__ as router_main
from services.router.config import RouterConfig
from tests.e2e.stack import Stack
from tests.security.certs import Authority
from tests.security.conftest import Tokens, random_adapter


def problem(argv: list[str], env: dict[str, str] | None = None) -> str:
    config = load_config(RouterConfig, ["--workers", "127.0.0.1:1", *argv], env=env or {})
    with pytest.raises(ConfigError) as caught:
        config.check()
    return str(caught.value)


def test_bad_security_files_name_their_flag(tmp_path: Path):
    ca = Authority.create(tmp_path)
    one, two = ca.issue("one"), ca.issue("two")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    missing = str(tmp_path / "missing")
    cases = {
        (
            "--auth-key-file",
            missing,
        ): r"--auth-key-file \(MANYLORA_AUTH_KEY_FILE\): cannot read .*: No such file",
        ("--auth-key-file", str(short)): r"--auth-key-file \(MANYLORA_AUTH_KEY_FILE\): .*shorter",
        ("--tls-cert-file", one.cert_file): "--tls-key-file .*both",
        ("--tls-key-file", one.key_file): "--tls-cert-file .*both",
        ("--tls-client-ca-file", ca.cert_file): "--tls-client-ca-file .*needs --tls-cert-file",
        ("--tls-ca-file", missing): "--tls-ca-file .*cannot read",
        ("--tls-ca-file", str(junk)): "--tls-ca-file .*not PEM",
        ("--service-token-file", missing): "--service-token-file .*cannot read",
    }
    for argv, expected in cases.items():
        assert re.search(expected, problem(list(argv))), argv
    mismatch = problem(["--tls-cert-file", one.cert_file, "--tls-key-file", two.key_file])
    assert mismatch.startswith("--tls-key-file") and "do not go together" in mismatch
    from_env = problem([], {"MANYLORA_TLS_CERT_FILE": str(junk), "MANYLORA_TLS_KEY_FILE": "x"})
    assert from_env.startswith("--tls-cert-file (MANYLORA_TLS_CERT_FILE)") and "not PEM" in from_env


def test_router_with_a_missing_key_file_exits_2_with_one_line(tmp_path: Path, capsys):
    missing = str(tmp_path / "nope.key")
    with pytest.raises(SystemExit) as caught:
        router_main.main(["--workers", "127.0.0.1:1", "--auth-key-file", missing])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--auth-key-file (MANYLORA_AUTH_KEY_FILE)" in err


def test_store_settings_have_no_outbound_flags():
    fields = set(vars(AdapterStoreConfig()))
    assert {"auth_key_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"} <= fields
    assert not {"tls_ca_file", "service_token_file"} & fields  # the store calls no service


async def test_command_line_clients_send_their_token(
    secured: Stack, tokens: Tokens, tmp_path: Path, monkeypatch, capsys
):
    assert secured.store is not None
    store = f"127.0.0.1:{secured.store.port}"
    router = f"127.0.0.1:{secured.routers[0].port}"
    write_file, generate_file = tmp_path / "write.token", tmp_path / "generate.token"
    write_file.write_text(tokens.write + "\n")
    generate_file.write_text(tokens.generate)
    folder = random_adapter(tmp_path / "cli-ad", seed=3)

    def store_cli_run(*argv: str) -> int:
        return store_cli.main([*argv, "--target", store])

    monkeypatch.delenv("MANYLORA_TOKEN", raising=False)
    upload = ("upload", str(folder), "--id", "cli-ad")
    assert await asyncio.to_thread(store_cli_run, *upload) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert await asyncio.to_thread(store_cli_run, *upload, "--token-file", str(generate_file)) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert await asyncio.to_thread(store_cli_run, *upload, "--token-file", str(write_file)) == 0
    assert "uploaded cli-ad v1" in capsys.readouterr().out

    generate = ("hello", "--adapter", "cli-ad", "--max-new-tokens", "2", "--target", router)
    assert await asyncio.to_thread(client_cli.main, list(generate)) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("MANYLORA_TOKEN", tokens.generate)
    assert await asyncio.to_thread(client_cli.main, list(generate)) == 0
    assert "finish length" in capsys.readouterr().err
    monkeypatch.setenv("MANYLORA_TOKEN", tokens.write)  # a file given wins over the variable
    with_file = [*generate, "--token-file", str(generate_file)]
    assert await asyncio.to_thread(client_cli.main, with_file) == 0
