"""The canonical adapter format: its safetensors blob read back by the format's own spec (an
8-byte little-endian header length, a JSON header, raw tensor bytes), the round trip, and the
bounds on untrusted headers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.common.lora_format import (
    MAX_SAFETENSORS_HEADER_BYTES,
    AdapterKey,
    CanonicalAdapter,
    read_safetensors_header,
    read_safetensors_metadata,
)


def _adapter(dtype: torch.dtype = torch.float32) -> CanonicalAdapter:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return CanonicalAdapter(
        adapter_id="ad-1",
        rank=3,
        alpha=0.1,  # neither 0.1 nor 1/3 has a short decimal form: the round trip is exact
        scaling=1 / 3,
        base_model="llama-test",
        lora_a={"v_proj": rand(2, 2, 8), "down_proj": rand(2, 3, 12)},
        lora_b={"v_proj": rand(2, 4, 2), "down_proj": rand(2, 8, 3)},
        version=7,
        sha256="ab" * 32,
    )


def _blob(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _parse_by_spec(blob: bytes) -> dict:
    (length,) = struct.unpack("<Q", blob[:8])
    parsed: dict = json.loads(blob[8 : 8 + length])
    return parsed


def test_key_target_modules_and_dtype_name():
    adapter = _adapter()
    assert adapter.key == AdapterKey("ad-1", 7, "ab" * 32) == ("ad-1", 7, "ab" * 32)
    assert adapter.target_modules == ("down_proj", "v_proj")  # sorted, not insertion order
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    for dtype, name in names.items():
        assert _adapter(dtype).dtype_name == name


def test_blob_holds_the_tensors_and_scalars_under_the_documented_names():
    adapter = _adapter()
    blob = adapter.to_bytes()
    header = _parse_by_spec(blob)
    assert header["__metadata__"] == {
        "adapter_id": "ad-1",
        "rank": "3",
        "alpha": "0.1",
        "scaling": repr(1 / 3),
        "base_model": "llama-test",
    }
    names = {"v_proj.lora_A", "v_proj.lora_B", "down_proj.lora_A", "down_proj.lora_B"}
    assert set(header) - {"__metadata__"} == names
    tensors = st_load(blob)
    for proj in ("v_proj", "down_proj"):
        assert torch.equal(tensors[f"{proj}.lora_A"], adapter.lora_a[proj])
        assert torch.equal(tensors[f"{proj}.lora_B"], adapter.lora_b[proj])


def test_the_same_adapter_is_the_same_bytes_every_time():
    """An adapter's sha256 is that of its blob: two serializations, in one process or two
    (the same weights in new tensors), must be equal byte for byte, header padded to 8 bytes
    as safetensors pads it."""
    blobs = {_adapter().to_bytes() for _ in range(20)}
    assert len(blobs) == 1
    (blob,) = blobs
    (length,) = struct.unpack("<Q", blob[:8])
    assert length % 8 == 0
    assert CanonicalAdapter.from_bytes(blob).to_bytes() == blob  # read back, written again


def test_round_trip_keeps_every_field_but_the_store_identity():
    adapter = _adapter(torch.bfloat16)
    back = CanonicalAdapter.from_bytes(adapter.to_bytes())
    scalars = ("adapter_id", "rank", "alpha", "scaling", "base_model")
    assert [getattr(back, f) for f in scalars] == [getattr(adapter, f) for f in scalars]
    # version and sha256 live outside the blob (the store's), so they come back unset.
    assert (back.version, back.sha256) == (0, "")
    assert back.target_modules == adapter.target_modules
    for proj in adapter.target_modules:
        assert torch.equal(back.lora_a[proj], adapter.lora_a[proj])
        assert torch.equal(back.lora_b[proj], adapter.lora_b[proj])
        assert back.lora_a[proj].dtype == torch.bfloat16


def test_non_contiguous_tensors_serialize():
    adapter = _adapter()
    transposed = adapter.lora_b["v_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous()
    adapter.lora_b["v_proj"] = transposed
    back = CanonicalAdapter.from_bytes(adapter.to_bytes())
    assert torch.equal(back.lora_b["v_proj"], transposed)


def test_blob_without_base_model_reads_as_empty():
    blob = st_save(
        {"q_proj.lora_A": torch.zeros(1, 1, 4), "q_proj.lora_B": torch.zeros(1, 4, 1)},
        metadata={"adapter_id": "x", "rank": "1", "alpha": "2.0", "scaling": "2.0"},
    )
    adapter = CanonicalAdapter.from_bytes(blob)
    assert (adapter.adapter_id, adapter.rank, adapter.alpha, adapter.base_model) == (
        "x",
        1,
        2.0,
        "",
    )
    assert list(adapter.lora_a) == list(adapter.lora_b) == ["q_proj"]


def test_to_moves_and_casts_the_tensors_and_keeps_the_rest():
    adapter = _adapter()
    half = adapter.to("cpu", torch.float16)
    fields = ("adapter_id", "rank", "alpha", "scaling", "base_model", "version", "sha256")
    assert [getattr(half, f) for f in fields] == [getattr(adapter, f) for f in fields]
    for proj in adapter.target_modules:
        assert torch.equal(half.lora_a[proj], adapter.lora_a[proj].half())
        assert torch.equal(half.lora_b[proj], adapter.lora_b[proj].half())
    # The meta device stands for a GPU: the device argument is honoured, not only the dtype.
    moved = adapter.to(torch.device("meta"), torch.float32)
    assert {t.device.type for t in [*moved.lora_a.values(), *moved.lora_b.values()]} == {"meta"}


# ---- Untrusted headers --------------------------------------------------------------------


def test_a_blob_shorter_than_the_length_field_is_refused():
    with pytest.raises(ValueError, match=r"^not a safetensors blob: shorter than its 8-byte"):
        read_safetensors_header(b"\x02" + b"\x00" * 6)
    # Eight bytes are a length field (0) with an empty header: a JSON error, not "shorter".
    with pytest.raises(ValueError, match=r"^not a safetensors blob: header not valid JSON"):
        read_safetensors_header(b"\x00" * 8)


def test_a_header_may_fill_the_blob_but_not_run_past_it():
    assert read_safetensors_header(_blob(b"{}")) == {}
    with pytest.raises(ValueError, match=r"^not a safetensors blob: header runs past the end$"):
        read_safetensors_header(_blob(b"{}")[:-1])
    # The length is unsigned: 2^64 - 1 is past any end, not a negative length.
    with pytest.raises(ValueError, match="header runs past the end"):
        read_safetensors_header(b"\xff" * 8 + b"{}")


def test_header_size_limit_is_inclusive():
    limit = MAX_SAFETENSORS_HEADER_BYTES
    assert read_safetensors_header(_blob(b"{" + b" " * (limit - 2) + b"}")) == {}
    with pytest.raises(ValueError, match=f"^safetensors header: {limit + 1} bytes is over"):
        read_safetensors_header(_blob(b"{" + b" " * (limit - 1) + b"}"))


def test_metadata_must_be_an_object_when_present():
    assert read_safetensors_header(_blob(b'{"__metadata__": null}')) == {"__metadata__": None}
    with pytest.raises(ValueError, match=r"^not a safetensors blob: __metadata__ is not a JSON"):
        read_safetensors_header(_blob(b'{"__metadata__": "x"}'))
    with pytest.raises(ValueError, match=r"^not a safetensors blob: header is not a JSON object$"):
        read_safetensors_header(_blob(b'"x"'))


def test_metadata_values_read_as_strings():
    assert read_safetensors_metadata(_blob(b"{}")) == {}
    header = b'{"__metadata__": {"rank": 4, "name": "x"}, "t": {}}'
    assert read_safetensors_metadata(_blob(header)) == {"rank": "4", "name": "x"}
