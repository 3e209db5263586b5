"""The canonical adapter layout that workers load, and its safetensors serialization.

Per target projection `p` (any of q/k/v/o_proj and gate/up/down_proj) the canonical weights
are two stacked tensors: `p.lora_A` of shape [num_layers, r_p, in_features] and `p.lora_B` of
shape [num_layers, out_features, r_p], with each module's scaling (alpha / r, or alpha / sqrt(r)
with rslora; per module under rank_pattern / alpha_pattern) already folded into B, so that the
LoRA delta of layer l is `x @ A[l].T @ B[l].T`.

Ranks are per projection, not per adapter: r_p is the largest rank of projection p over the
layers, so an adapter with rank 64 on q_proj and 8 on down_proj stores down_proj at rank 8.
Within one projection, layers of smaller rank and layers the adapter does not touch are
zero-padded to r_p (the worker's pool lays one slot list across all layers of a projection),
which leaves the math exact. `CanonicalAdapter.rank` is the largest r_p.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from services.common.bounded_json import JsonBoundsError, loads_bounded

# Safetensors headers are small (about 130 bytes a tensor); the library itself allows 100 MB.
MAX_SAFETENSORS_HEADER_BYTES = 4 << 20
# A header is an object of objects holding arrays: 3 levels; a little slack for metadata.
MAX_SAFETENSORS_HEADER_DEPTH = 8
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class AdapterKey(NamedTuple):
    """What an adapter is, as a value: two objects with equal keys hold the same weights."""

    adapter_id: str
    version: int
    sha256: str


@dataclass
class CanonicalAdapter:
    """One adapter in canonical layout (see module docstring)."""

    adapter_id: str
    rank: int
    alpha: float
    scaling: float
    base_model: str
    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)
    # The store's version and the hex sha256 of the canonical blob (`to_bytes`); neither is
    # inside the blob. Adapters built in-process without them (0, "") are known by id alone.
    version: int = 0
    sha256: str = ""

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.adapter_id, self.version, self.sha256)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.lora_a))

    @property
    def dtype_name(self) -> str:
        first = next(iter(self.lora_a.values()))
        return _DTYPE_NAMES[first.dtype]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CanonicalAdapter:
        return CanonicalAdapter(
            adapter_id=self.adapter_id,
            rank=self.rank,
            alpha=self.alpha,
            scaling=self.scaling,
            base_model=self.base_model,
            lora_a={p: t.to(device=device, dtype=dtype) for p, t in self.lora_a.items()},
            lora_b={p: t.to(device=device, dtype=dtype) for p, t in self.lora_b.items()},
            version=self.version,
            sha256=self.sha256,
        )

    def to_bytes(self) -> bytes:
        """A safetensors blob: tensors `p.lora_A`, `p.lora_B`; the scalars in its metadata.
        The same adapter gives the same bytes: its identity's sha256 is theirs."""
        tensors, meta = self._tensors_and_meta()
        return _with_metadata(bytes(st_save(tensors)), meta)

    def to_file(self, path: str) -> None:
        """The same tensors and metadata written straight into a safetensors file, not the
        identity's bytes (their canonical header means building the blob twice: 30 ms against
        6 ms for a Llama-7B rank-8 adapter on a 2-core machine)."""
        tensors, meta = self._tensors_and_meta()
        st_save_file(tensors, path, metadata=meta)

    def _tensors_and_meta(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors: dict[str, torch.Tensor] = {}
        for proj in self.target_modules:
            tensors[f"{proj}.lora_A"] = self.lora_a[proj].contiguous()
            tensors[f"{proj}.lora_B"] = self.lora_b[proj].contiguous()
        meta = {
            "adapter_id": self.adapter_id,
            "rank": str(self.rank),
            "alpha": repr(self.alpha),
            "scaling": repr(self.scaling),
            "base_model": self.base_model,
        }
        return tensors, meta

    @classmethod
    def from_bytes(cls, blob: bytes) -> CanonicalAdapter:
        return cls._from(read_safetensors_metadata(blob), st_load(blob))

    @classmethod
    def from_file(cls, path: str) -> CanonicalAdapter:
        """An adapter `to_file` wrote, copied into memory: safetensors maps the file, and a
        mapping would hold the file's memory (in /dev/shm: shared memory) while it lives."""
        with safe_open(path, framework="pt") as file:
            meta = file.metadata() or {}
            # safe_open is not a mapping: iterating it does not give its names.
            tensors = {name: file.get_tensor(name).clone() for name in file.keys()}  # noqa: SIM118
        return cls._from(meta, tensors)

    @classmethod
    def _from(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> CanonicalAdapter:
        adapter = cls(
            adapter_id=meta["adapter_id"],
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            scaling=float(meta["scaling"]),
            base_model=meta.get("base_model", ""),
        )
        for name, tensor in tensors.items():
            proj, _, kind = name.partition(".")
            target = adapter.lora_a if kind == "lora_A" else adapter.lora_b
            target[proj] = tensor
        return adapter


def _with_metadata(blob: bytes, meta: dict[str, str]) -> bytes:
    """`blob` (a safetensors file without metadata) with `meta` in its header, the same bytes
    for the same adapter every time: safetensors writes a metadata map in an order that
    changes from call to call, and an adapter's sha256 is that of these bytes. The header
    stays padded to 8 bytes with spaces, as safetensors pads it."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"))
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + header_len :]


def read_safetensors_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors blob (8-byte little-endian length, then JSON), checked
    for size and nesting before it is parsed; `ValueError` when it is not one."""
    if len(blob) < 8:
        raise ValueError("not a safetensors blob: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise ValueError("not a safetensors blob: header runs past the end")
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise ValueError(
            f"safetensors header: {header_len} bytes is over the limit of "
            f"{MAX_SAFETENSORS_HEADER_BYTES}"
        )
    try:
        header = loads_bounded(
            blob[8 : 8 + header_len], MAX_SAFETENSORS_HEADER_BYTES, MAX_SAFETENSORS_HEADER_DEPTH
        )
    except JsonBoundsError as exc:
        raise ValueError(f"not a safetensors blob: header {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("not a safetensors blob: header is not a JSON object")
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise ValueError("not a safetensors blob: __metadata__ is not a JSON object")
    return header


def read_safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` map of a safetensors blob."""
    meta = read_safetensors_header(blob).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
