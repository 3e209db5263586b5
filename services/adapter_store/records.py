"""Adapter ids and the `AdapterInfo` record as stored next to each blob."""

from __future__ import annotations

import hashlib

from google.protobuf import json_format

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.common.ids import adapter_id_problem
from services.common.lora_format import CanonicalAdapter


def check_adapter_id(adapter_id: str) -> None:
    problem = adapter_id_problem(adapter_id)
    if problem is not None:
        raise InvalidArgument(problem)


def make_info(adapter: CanonicalAdapter, blob: bytes, version: int) -> common_pb2.AdapterInfo:
    return common_pb2.AdapterInfo(
        adapter_id=adapter.adapter_id,
        version=version,
        rank=adapter.rank,
        alpha=adapter.alpha,
        scaling=adapter.scaling,
        target_modules=list(adapter.target_modules),
        base_model=adapter.base_model,
        dtype=adapter.dtype_name,
        size_bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )


def info_to_json(info: common_pb2.AdapterInfo) -> bytes:
    text = json_format.MessageToJson(info, preserving_proto_field_name=True, indent=2)
    return text.encode()


def info_from_json(data: bytes | str) -> common_pb2.AdapterInfo:
    return json_format.Parse(data, common_pb2.AdapterInfo())
