"""Operators' command line for the adapter store.

    python -m services.adapter_store.cli upload PATH [--id ID] --target HOST:PORT
    python -m services.adapter_store.cli import FOLDER --target HOST:PORT
    python -m services.adapter_store.cli list | info ID [--version N] | delete ID

With a store that requires tokens: --token-file FILE (or MANYLORA_TOKEN), a token with scope
adapters:write; with TLS: --tls-ca-file (and --tls-cert-file, --tls-key-file for mutual TLS).

Exit status 0 on success, 1 when the store refused or failed (its message is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from tqdm import tqdm

from manylora.v1 import adapter_store_pb2, common_pb2
from manylora.v1.adapter_store_pb2_grpc import AdapterStoreStub
from services.common.channels import sync_channel
from services.common.client_flags import (
    ClientFlagError,
    add_security_flags,
    security_from_args,
)
from services.common.grpc_server import SERVER_OPTIONS
from services.common.ids import adapter_id_problem
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE

DEFAULT_TARGET = os.environ.get("MANYLORA_STORE_TARGET", "127.0.0.1:50052")
UPLOAD_CHUNK_BYTES = 2 << 20
CALL_TIMEOUT_S = 30.0


class CliError(Exception):
    """A failure to report to the operator in one line."""


def _upload_messages(
    adapter_id: str, folder: Path, progress: tqdm
) -> Iterator[adapter_store_pb2.UploadAdapterRequest]:
    weights = folder / WEIGHTS_FILE
    header = adapter_store_pb2.UploadHeader(
        adapter_id=adapter_id,
        adapter_config_json=(folder / CONFIG_FILE).read_text(),
        total_size=weights.stat().st_size,
    )
    yield adapter_store_pb2.UploadAdapterRequest(header=header)
    with open(weights, "rb") as fh:
        while chunk := fh.read(UPLOAD_CHUNK_BYTES):
            yield adapter_store_pb2.UploadAdapterRequest(chunk=chunk)
            progress.update(len(chunk))


def upload(stub: AdapterStoreStub, folder: Path, adapter_id: str | None) -> common_pb2.AdapterInfo:
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise CliError(f"{folder}: no {needed} there")
    adapter_id = adapter_id or folder.name
    problem = adapter_id_problem(adapter_id)
    if problem is not None:  # said here, before a large file travels to be refused
        raise CliError(problem)
    size = (folder / WEIGHTS_FILE).stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=adapter_id, leave=False) as progress:
        info: common_pb2.AdapterInfo = stub.UploadAdapter(
            _upload_messages(adapter_id, folder, progress)
        )
    return info


def describe(info: common_pb2.AdapterInfo) -> str:
    return (
        f"{info.adapter_id} v{info.version}: rank {info.rank}, alpha {info.alpha:g}, "
        f"{','.join(info.target_modules)}, {info.dtype}, {info.size_bytes} bytes, "
        f"sha256 {info.sha256}"
    )


def _cmd_upload(stub: AdapterStoreStub, args: argparse.Namespace) -> int:
    print("uploaded " + describe(upload(stub, Path(args.path), args.id)))
    return 0


def _cmd_import(stub: AdapterStoreStub, args: argparse.Namespace) -> int:
    folders = sorted(p for p in Path(args.folder).iterdir() if (p / CONFIG_FILE).is_file())
    if not folders:
        raise CliError(f"{args.folder}: no sub-folder holds an {CONFIG_FILE}")
    failed = 0
    for folder in tqdm(folders, desc="import", unit="adapter"):
        try:
            print("uploaded " + describe(upload(stub, folder, None)))
        except (grpc.RpcError, CliError, OSError) as exc:
            failed += 1
            print(f"error: {folder.name}: {_error_text(exc)}", file=sys.stderr)
    print(f"imported {len(folders) - failed} of {len(folders)} adapters")
    return 1 if failed else 0


def _cmd_list(stub: AdapterStoreStub, args: argparse.Namespace) -> int:
    token = ""
    while True:
        page = stub.ListAdapters(
            common_pb2.ListAdaptersRequest(page_size=args.page_size, page_token=token),
            timeout=CALL_TIMEOUT_S,
        )
        for info in page.adapters:
            print(describe(info))
        token = page.next_page_token
        if not token:
            return 0


def _cmd_info(stub: AdapterStoreStub, args: argparse.Namespace) -> int:
    request = adapter_store_pb2.GetAdapterInfoRequest(adapter_id=args.id, version=args.version)
    print(describe(stub.GetAdapterInfo(request, timeout=CALL_TIMEOUT_S)))
    return 0


def _cmd_delete(stub: AdapterStoreStub, args: argparse.Namespace) -> int:
    request = adapter_store_pb2.DeleteAdapterRequest(adapter_id=args.id)
    reply = stub.DeleteAdapter(request, timeout=CALL_TIMEOUT_S)
    count = reply.deleted_versions
    print(f"deleted {args.id} ({count} version{'' if count == 1 else 's'})")
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="store address host:port (env MANYLORA_STORE_TARGET, default %(default)s)",
    )
    add_security_flags(common)
    parser = argparse.ArgumentParser(prog="python -m services.adapter_store.cli")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("upload", parents=[common], help="upload one PEFT folder")
    cmd.add_argument("path", help="folder with adapter_config.json and adapter_model.safetensors")
    cmd.add_argument("--id", help="adapter id (default: the folder's name)")
    cmd.set_defaults(run=_cmd_upload)
    cmd = commands.add_parser("import", parents=[common], help="upload every PEFT sub-folder")
    cmd.add_argument("folder", help="folder whose sub-folders are PEFT adapters (id = name)")
    cmd.set_defaults(run=_cmd_import)
    cmd = commands.add_parser("list", parents=[common], help="list stored adapters")
    cmd.add_argument("--page-size", type=int, default=100)
    cmd.set_defaults(run=_cmd_list)
    cmd = commands.add_parser("info", parents=[common], help="show one adapter")
    cmd.add_argument("id")
    cmd.add_argument("--version", type=int, default=0, help="0 (default) means the newest")
    cmd.set_defaults(run=_cmd_info)
    cmd = commands.add_parser("delete", parents=[common], help="delete every version of one")
    cmd.add_argument("id")
    cmd.set_defaults(run=_cmd_delete)
    return parser


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    run: Callable[[AdapterStoreStub, argparse.Namespace], int] = args.run
    try:
        security = security_from_args(args)
    except ClientFlagError as exc:
        parser.error(str(exc))
    with sync_channel(args.target, security, SERVER_OPTIONS) as channel:
        try:
            return run(AdapterStoreStub(channel), args)
        except (grpc.RpcError, CliError, OSError) as exc:
            print(f"error: {_error_text(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            # Closing the channel cancels an upload in flight; the store keeps nothing of it.
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
