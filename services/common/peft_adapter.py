"""Read a PEFT LoRA adapter, validate it against the base model, convert it to canonical form.

The config and the modules it selects are `peft_config`'s; here the weights: every tensor must
be lora_A / lora_B of a selected module, finite, of the base model's shape, and each module's
scaling is folded into its B. Validation happens once, at upload (or at load for adapters given
as local folders).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from services.common.base_model import LINEAR_MODULES, BaseModelShape
from services.common.lora_format import CanonicalAdapter, read_safetensors_header
from services.common.peft_config import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    AdapterValidationError,
    LoraOptions,
    ModelModule,
    model_modules,
    parse_config,
    pattern_key_for,
    selected_modules,
)

WEIGHTS_FILE = "adapter_model.safetensors"
# CONFIG_FILE and AdapterValidationError are peft_config's, named here for callers of both.
__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterValidationError",
    "canonicalize",
    "load_peft_folder",
]
_PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped model's root
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _split_key(key: str) -> tuple[str, str] | None:
    """("model.layers.3.mlp.down_proj", "A") from a PEFT LoRA weight key, or None."""
    if not key.startswith(_PEFT_PREFIX):
        return None
    for suffix, kind in _LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(_PEFT_PREFIX) : -len(suffix)], kind
    return None


def _weight_key(module_name: str, kind: str) -> str:
    return f"{_PEFT_PREFIX}{module_name}.lora_{kind}.weight"


def _check_weight_names(
    names: Iterable[str], selected: dict[str, ModelModule], shape: BaseModelShape
) -> None:
    """Every tensor must be lora_A/lora_B of a selected module; every selected module needs
    both. Checked on the header, before any tensor is read."""
    linear = {m.name: m for m in model_modules(shape) if m.proj is not None}
    present: set[tuple[str, str]] = set()
    for key in sorted(names):
        split = _split_key(key)
        if split is None or split[0] not in linear:
            raise AdapterValidationError(
                key,
                "unexpected tensor; only lora_A/lora_B weights of the base model's "
                f"{'/'.join(LINEAR_MODULES)} layers (0..{shape.num_layers - 1}) are allowed",
            )
        if split[0] not in selected:
            raise AdapterValidationError(
                key,
                "its module is not selected by target_modules (PEFT would not load it); "
                "fix target_modules or remove the tensor",
            )
        present.add(split)
    for name in selected:
        for kind in ("A", "B"):
            if (name, kind) not in present:
                raise AdapterValidationError(
                    _weight_key(name, kind), "missing (target_modules selects this module)"
                )


def _load_tensors(
    weights: bytes, selected: dict[str, ModelModule], shape: BaseModelShape
) -> dict[str, torch.Tensor]:
    try:
        header = read_safetensors_header(weights)
    except ValueError as exc:
        raise AdapterValidationError(
            WEIGHTS_FILE, f"not a readable safetensors file ({exc})"
        ) from exc
    _check_weight_names((k for k in header if k != "__metadata__"), selected, shape)
    try:
        tensors = st_load(weights)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise AdapterValidationError(
            WEIGHTS_FILE, f"not a readable safetensors file ({exc})"
        ) from exc
    for key, tensor in tensors.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterValidationError(key, f"dtype {tensor.dtype} not supported")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError(key, "has non-finite values (NaN or inf)")
    return tensors


# ---- Conversion --------------------------------------------------------------------------------


def _module_rank_and_scaling(opts: LoraOptions, module_name: str) -> tuple[int, float]:
    """PEFT's LoraModel._create_and_replace: rank and alpha from the first matching pattern."""
    r_key = pattern_key_for(opts.rank_pattern, module_name)
    a_key = pattern_key_for(opts.alpha_pattern, module_name)
    rank = opts.rank_pattern[r_key] if r_key is not None else opts.r
    alpha = float(opts.alpha_pattern[a_key]) if a_key is not None else opts.alpha
    return rank, alpha / math.sqrt(rank) if opts.use_rslora else alpha / rank


def _check_module_shapes(
    module: ModelModule,
    a: torch.Tensor,
    b: torch.Tensor,
    rank: int,
    shape: BaseModelShape,
    max_rank: int,
) -> None:
    assert module.proj is not None
    in_f, out_f = shape.proj_dims(module.proj)
    if tuple(a.shape) != (rank, in_f):
        raise AdapterValidationError(
            _weight_key(module.name, "A"), f"shape {list(a.shape)} != {[rank, in_f]}"
        )
    if tuple(b.shape) != (out_f, rank):
        raise AdapterValidationError(
            _weight_key(module.name, "B"), f"shape {list(b.shape)} != {[out_f, rank]}"
        )
    if rank > max_rank:
        raise AdapterValidationError(
            _weight_key(module.name, "A"), f"rank {rank} > max rank {max_rank}"
        )


def canonicalize(
    adapter_id: str, config_json: str, weights: bytes, shape: BaseModelShape, max_rank: int
) -> CanonicalAdapter:
    """Validate a PEFT adapter against `shape` and return it in canonical layout."""
    opts = parse_config(config_json)
    selected = selected_modules(opts, shape)
    tensors = _load_tensors(weights, selected, shape)
    ranks: dict[str, tuple[int, float]] = {}
    for name, module in selected.items():
        ranks[name] = _module_rank_and_scaling(opts, name)
        a, b = tensors[_weight_key(name, "A")], tensors[_weight_key(name, "B")]
        _check_module_shapes(module, a, b, ranks[name][0], shape, max_rank)
    proj_rank: dict[str, int] = {}
    for name, module in selected.items():
        assert module.proj is not None
        proj_rank[module.proj] = max(proj_rank.get(module.proj, 0), ranks[name][0])
    dtype = next(iter(tensors.values())).dtype
    adapter = CanonicalAdapter(
        adapter_id=adapter_id,
        rank=max(proj_rank.values()),
        alpha=opts.alpha,
        scaling=opts.alpha / math.sqrt(opts.r) if opts.use_rslora else opts.alpha / opts.r,
        base_model=opts.base_model,
    )
    for proj in sorted(proj_rank, key=LINEAR_MODULES.index):
        in_f, out_f = shape.proj_dims(proj)
        adapter.lora_a[proj] = torch.zeros(shape.num_layers, proj_rank[proj], in_f, dtype=dtype)
        adapter.lora_b[proj] = torch.zeros(shape.num_layers, out_f, proj_rank[proj], dtype=dtype)
    for name, module in selected.items():
        assert module.proj is not None and module.layer is not None
        rank, scaling = ranks[name]
        # Fold in float32: a half-precision adapter then loses one rounding, no more.
        folded = (tensors[_weight_key(name, "B")].float() * scaling).to(dtype)
        if not bool(torch.isfinite(folded).all()):
            raise AdapterValidationError(
                "alpha_pattern" if opts.alpha_pattern else "lora_alpha",
                f"scaling {scaling!r} of {name} overflows {dtype} once folded into lora_B",
            )
        adapter.lora_a[module.proj][module.layer, :rank] = tensors[_weight_key(name, "A")]
        adapter.lora_b[module.proj][module.layer, :, :rank] = folded
    return adapter


def load_peft_folder(
    path: str | Path, shape: BaseModelShape, max_rank: int, adapter_id: str | None = None
) -> CanonicalAdapter:
    """Read `adapter_config.json` and `adapter_model.safetensors` from a PEFT folder."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise AdapterValidationError(needed.name, f"missing in {folder}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterValidationError(CONFIG_FILE, f"over the limit of {MAX_CONFIG_BYTES} bytes")
    return canonicalize(
        adapter_id or folder.name,
        config_path.read_text(),
        weights_path.read_bytes(),
        shape,
        max_rank,
    )
