"""The registry record a worker writes and a router reads: a round trip keeps the address
and stats, and anything that is not a registration is refused with ValueError (a router skips
such an entry instead of failing its poll)."""

from __future__ import annotations

import json

import pytest

from manylora.v1 import gpu_worker_pb2
from services.common.worker_record import decode_record, encode_record


def test_a_record_round_trips():
    stats = gpu_worker_pb2.GetStatsResponse(
        model="tiny", total_slots=4096, resident_adapters=["a", "b"]
    )
    address, decoded = decode_record(encode_record("10.0.0.7:50051", stats).encode())
    assert address == "10.0.0.7:50051"
    assert decoded == stats


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"stats": {}}),
        json.dumps({"address": "", "stats": {}}),
        json.dumps({"address": 7, "stats": {}}),
        json.dumps({"address": "h:1", "stats": {"no_such_field": 1}}),
    ],
)
def test_what_is_not_a_registration_is_refused(text):
    with pytest.raises(ValueError):
        decode_record(text)
