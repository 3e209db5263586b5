"""Read a PEFT LoRA adapter, validate it against the base model, convert it to canonical form.

Every refusal is an `AdapterValidationError` naming the offending key, so that the store can
answer INVALID_ARGUMENT with a reason a person can act on. Validation happens once, at upload
(or at load for adapters given as local folders).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from services.common.base_model import TARGET_MODULES, BaseModelShape
from services.common.lora_format import CanonicalAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$"
)
# PEFT options that change the math beyond plain LoRA on q/k/v/o: refused when set.
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    # LoRA variants (PEFT marks them is_lora_variant) whose forward differs from x·Aᵀ·Bᵀ.
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AdapterValidationError(ValueError):
    """An adapter refused at validation; `key` names what is wrong in it."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class _LoraOptions:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str


def _pattern_value(patterns: dict[str, Any], module_name: str) -> Any | None:
    """PEFT's rule: a pattern key matches a module name exactly or as a dotted suffix regex."""
    for key, value in patterns.items():
        if key == module_name or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def _parse_config(config_json: str) -> _LoraOptions:
    try:
        cfg = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise AdapterValidationError(CONFIG_FILE, f"not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterValidationError(CONFIG_FILE, "must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(
            "peft_type", f"only LORA is supported, got {cfg['peft_type']!r}"
        )
    for option in _UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise AdapterValidationError(option, f"is set ({cfg[option]!r}); not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterValidationError("bias", f"only 'none' is supported, got {cfg['bias']!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets == "all-linear":
        raise AdapterValidationError(
            "target_modules", "'all-linear' targets MLP projections; only q/k/v/o are supported"
        )
    if isinstance(targets, list):
        unsupported = sorted(set(targets) - set(TARGET_MODULES))
        if unsupported:
            raise AdapterValidationError(
                "target_modules",
                f"{', '.join(unsupported)} not supported; supported: {', '.join(TARGET_MODULES)}",
            )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterValidationError("r", f"must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterValidationError("lora_alpha", f"must be a finite number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise AdapterValidationError(name, "must be an object of pattern -> value")
    _check_options(cfg)
    return _LoraOptions(
        r=r,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        base_model=str(cfg.get("base_model_name_or_path") or ""),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_options(cfg: dict[str, Any]) -> None:
    """Types of the options whose values change the math (a wrong type must not slip through
    as truthy). fan_in_fan_out may be either: PEFT itself ignores it for nn.Linear targets."""
    for flag in ("use_rslora", "fan_in_fan_out"):
        if cfg.get(flag) is not None and not isinstance(cfg[flag], bool):
            raise AdapterValidationError(flag, f"must be true or false, got {cfg[flag]!r}")
    for pattern, rank in (cfg.get("rank_pattern") or {}).items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise AdapterValidationError(
                f"rank_pattern.{pattern}", f"must be a positive integer, got {rank!r}"
            )
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if not _is_number(alpha):
            raise AdapterValidationError(
                f"alpha_pattern.{pattern}", f"must be a finite number, got {alpha!r}"
            )


def _load_tensors(weights: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(weights)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise AdapterValidationError(
            WEIGHTS_FILE, f"not a readable safetensors file ({exc})"
        ) from exc


def _group_modules(
    tensors: dict[str, torch.Tensor], shape: BaseModelShape
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """{(layer, proj): {"A": tensor, "B": tensor}}, refusing keys that are not q/k/v/o LoRA."""
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterValidationError(key, "unexpected tensor; only LoRA A/B of q/k/v/o allowed")
        layer, block, proj, kind = int(match[1]), match[2], match[3], match[4]
        if block != "self_attn" or proj not in TARGET_MODULES:
            raise AdapterValidationError(key, f"targets {block}.{proj}, which is not supported")
        if layer >= shape.num_layers:
            raise AdapterValidationError(key, f"layer {layer} >= base model's {shape.num_layers}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterValidationError(key, f"dtype {tensor.dtype} not supported")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError(key, "has non-finite values (NaN or inf)")
        modules.setdefault((layer, proj), {})[kind] = tensor
    if not modules:
        raise AdapterValidationError(WEIGHTS_FILE, "holds no LoRA tensors")
    return modules


def _module_rank_and_scaling(
    opts: _LoraOptions,
    layer: int,
    proj: str,
    a: torch.Tensor,
    b: torch.Tensor,
    shape: BaseModelShape,
    max_rank: int,
) -> tuple[int, float]:
    name = f"model.layers.{layer}.self_attn.{proj}"
    key = f"base_model.model.{name}"
    rank = _pattern_value(opts.rank_pattern, name) or opts.r
    in_f, out_f = shape.proj_dims(proj)
    if tuple(a.shape) != (rank, in_f):
        raise AdapterValidationError(
            f"{key}.lora_A.weight", f"shape {list(a.shape)} != {[rank, in_f]}"
        )
    if tuple(b.shape) != (out_f, rank):
        raise AdapterValidationError(
            f"{key}.lora_B.weight", f"shape {list(b.shape)} != {[out_f, rank]}"
        )
    if rank > max_rank:
        raise AdapterValidationError(f"{key}.lora_A.weight", f"rank {rank} > max rank {max_rank}")
    alpha = float(_pattern_value(opts.alpha_pattern, name) or opts.alpha)
    scaling = alpha / math.sqrt(rank) if opts.use_rslora else alpha / rank
    return int(rank), scaling


def canonicalize(
    adapter_id: str, config_json: str, weights: bytes, shape: BaseModelShape, max_rank: int
) -> CanonicalAdapter:
    """Validate a PEFT adapter against `shape` and return it in canonical layout."""
    opts = _parse_config(config_json)
    modules = _group_modules(_load_tensors(weights), shape)
    ranks: dict[tuple[int, str], tuple[int, float]] = {}
    for (layer, proj), pair in modules.items():
        for kind in ("A", "B"):
            if kind not in pair:
                raise AdapterValidationError(
                    f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{kind}.weight",
                    "missing (each module needs both lora_A and lora_B)",
                )
        ranks[(layer, proj)] = _module_rank_and_scaling(
            opts, layer, proj, pair["A"], pair["B"], shape, max_rank
        )
    rank = max(r for r, _ in ranks.values())
    dtype = next(iter(modules.values()))["A"].dtype
    adapter = CanonicalAdapter(
        adapter_id=adapter_id,
        rank=rank,
        alpha=opts.alpha,
        scaling=opts.alpha / math.sqrt(opts.r) if opts.use_rslora else opts.alpha / opts.r,
        base_model=opts.base_model,
    )
    for proj in sorted({p for _, p in modules}):
        in_f, out_f = shape.proj_dims(proj)
        a_all = torch.zeros(shape.num_layers, rank, in_f, dtype=dtype)
        b_all = torch.zeros(shape.num_layers, out_f, rank, dtype=dtype)
        for (layer, p), pair in modules.items():
            if p != proj:
                continue
            r_m, s_m = ranks[(layer, p)]
            a_all[layer, :r_m] = pair["A"]
            # Fold in float32: a half-precision adapter then loses one rounding, no more.
            b_all[layer, :, :r_m] = (pair["B"].float() * s_m).to(dtype)
        adapter.lora_a[proj] = a_all
        adapter.lora_b[proj] = b_all
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
    return canonicalize(
        adapter_id or folder.name,
        config_path.read_text(),
        weights_path.read_bytes(),
        shape,
        max_rank,
    )
