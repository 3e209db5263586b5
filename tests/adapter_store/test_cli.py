"""The operators' command line against a running store (its main() in a thread)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from services.adapter_store import cli
from services.common.grpc_server import free_port
from tests.adapter_store.helpers import store_config


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_upload_import_list_info_delete(
    tmp_path: Path, qv_adapter: Path, start_store, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_store(store_config(tmp_path / "data"))
    target = ["--target", f"127.0.0.1:{server.port}"]
    many = tmp_path / "many"
    for name in ("imp-1", "imp-2"):
        shutil.copytree(qv_adapter, many / name)
    (many / "notes").mkdir()  # no adapter_config.json: not an adapter, skipped

    upload = await _cli(capsys, "upload", str(qv_adapter), "--id", "cli-a", *target)
    imported = await _cli(capsys, "import", str(many), *target)
    listed = await _cli(capsys, "list", "--page-size", "2", *target)
    info = await _cli(capsys, "info", "imp-2", "--version", "1", *target)
    deleted = await _cli(capsys, "delete", "cli-a", *target)
    after_delete = await _cli(capsys, "info", "cli-a", *target)

    assert upload[0] == 0 and upload[1].startswith("uploaded cli-a v1: rank 8")
    assert imported[0] == 0 and "imported 2 of 2 adapters" in imported[1]
    assert listed[0] == 0
    assert [line.split(":")[0] for line in listed[1].splitlines()] == [
        "cli-a v1",
        "imp-1 v1",
        "imp-2 v1",
    ]
    assert info[0] == 0 and info[1].startswith("imp-2 v1: rank 8, alpha 16, q_proj,v_proj")
    assert deleted == (0, "deleted cli-a (1 version)\n", "")
    assert after_delete[0] == 1 and "NOT_FOUND" in after_delete[2] and "cli-a" in after_delete[2]


async def test_cli_prints_the_refusal_and_exits_non_zero(
    tmp_path: Path, qv_adapter: Path, start_store, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_store(store_config(tmp_path / "data"))
    bad = tmp_path / "bad"
    shutil.copytree(qv_adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))

    code, _, err = await _cli(capsys, "upload", str(bad), "--target", f"127.0.0.1:{server.port}")
    no_folder = await _cli(capsys, "upload", str(tmp_path / "nowhere"), "--target", "x:1")
    unreachable = await _cli(capsys, "list", "--target", f"127.0.0.1:{free_port()}")

    assert code == 1
    assert "error: INVALID_ARGUMENT: bias: only 'none' is supported, got 'all'" in err
    assert no_folder[0] == 1 and "no adapter_config.json" in no_folder[2]
    assert unreachable[0] == 1 and "error: UNAVAILABLE" in unreachable[2]


async def test_cli_refuses_a_bad_id_before_sending_anything(
    tmp_path: Path, qv_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No store listens there: the id is refused before any connection is tried.
    target = ["--target", f"127.0.0.1:{free_port()}"]
    code, out, err = await _cli(capsys, "upload", str(qv_adapter), "--id", "bad\n", *target)
    assert (code, out) == (1, "")
    assert err.startswith("error: adapter_id: 'bad\\n' ") and err.count("\n") == 1
