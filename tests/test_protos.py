"""The committed gRPC modules are what `make proto` makes from protos/ today."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "manylora" / "v1"


def test_generated_modules_are_fresh(tmp_path: Path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*_pb2*"))
    out = tmp_path / "protos"
    sources = sorted(str(p.relative_to(ROOT / "protos")) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{out}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    assert protoc.main(args) == 0
    generated = sorted(p.name for p in (out / "manylora" / "v1").glob("*_pb2*"))
    committed = sorted(p.name for p in PROTO_DIR.glob("*_pb2*"))
    assert generated == committed, "run `make proto` and commit the result"
    stale = [n for n in generated if not filecmp.cmp(out / "manylora/v1" / n, PROTO_DIR / n, False)]
    assert not stale, f"stale generated modules {stale}: run `make proto` and commit the result"


def test_contract_names_are_present():
    from manylora.v1 import adapter_store_pb2, common_pb2, gpu_worker_pb2, router_pb2

    assert set(router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name) == {
        "Generate",
        "ListAdapters",
    }
    assert set(adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"].methods_by_name) == {
        "UploadAdapter",
        "GetAdapterInfo",
        "FetchAdapter",
        "ListAdapters",
        "DeleteAdapter",
    }
    assert set(gpu_worker_pb2.DESCRIPTOR.services_by_name["GpuWorker"].methods_by_name) == {
        "Generate",
        "GetStats",
    }
    assert set(common_pb2.FinishReason.keys()) >= {"LENGTH", "STOP", "EOS", "ABORTED"}
