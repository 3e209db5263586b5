"""A PEFT LoRA `adapter_config.json`, read bounded and validated, and the modules it selects.

Every refusal is an `AdapterValidationError` naming the offending key. The selection
reproduces what PEFT itself loads: which modules `target_modules` / `exclude_modules` /
`layers_to_transform` select, and which `rank_pattern` / `alpha_pattern` entry applies to each
module (PEFT's first key `k` in order such that `re.match(rf"(.*\\.)?({k})$", module_name)`).
Nothing the sender wrote is ever compiled as a regular expression: a key made of plain
characters means the same under plain string logic (`.` standing for any one character, as in
a regex), and a key with any other regex metacharacter is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

from services.common.base_model import LINEAR_MODULES, MLP_MODULES, BaseModelShape, module_block
from services.common.bounded_json import JsonBoundsError, loads_bounded

CONFIG_FILE = "adapter_config.json"

# adapter_config.json files are about 1 KB; per-layer rank patterns of an 80-layer model ~25 KB.
MAX_CONFIG_BYTES = 256 << 10
MAX_CONFIG_DEPTH = 8
MAX_PATTERN_ENTRIES = 1024  # rank_pattern, alpha_pattern, target_modules, exclude_modules
MAX_KEY_IN_MESSAGE = 160
ALL_LINEAR = "all-linear"  # PEFT's shorthand; for a Llama-family model: LINEAR_MODULES

# LoraConfig's r and lora_alpha when the config leaves them out.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
# init_lora_weights values under which the trained adapter is plain LoRA on the unmodified base
# model. The others (pissa, olora, corda, loftq, lora_ga) change the base weights at training
# start, or (mica) the forward; such an adapter only fits our base model once PEFT has
# converted it at save time, which writes init_lora_weights=true.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# What a pattern key may contain beyond plain characters: refused, because its meaning as a
# regex differs from its meaning as text. `.` stays: as any-one-character it is matched exactly.
_REGEX_METACHARACTERS = frozenset("\\^$*+?{}[]|()")

# PEFT options that change the math beyond plain LoRA: refused when set (truthy).
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
    "megatron_config",
    "enable_lora",  # PEFT 0.2's merged-QKV layout
    # LoRA variants (PEFT marks them is_lora_variant) whose forward differs from x·Aᵀ·Bᵀ.
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
# Options that only matter for training, initialization or bookkeeping: any value is fine.
_INERT_OPTIONS = frozenset(
    {
        "task_type",
        "inference_mode",
        "revision",
        "auto_mapping",
        "peft_version",
        "lora_dropout",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        "ensure_weight_tying",
        "megatron_core",
        "qalora_group_size",
        "merge_weights",
        "base_model_name_or_path",
    }
)
_HANDLED_OPTIONS = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "bias",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
    }
)


class AdapterValidationError(ValueError):
    """An adapter refused at validation; `key` names what is wrong in it."""

    def __init__(self, key: str, reason: str):
        # Keys come from the sender (pattern keys, tensor names): keep the status message short.
        if len(key) > MAX_KEY_IN_MESSAGE:
            key = key[: MAX_KEY_IN_MESSAGE - 3] + "..."
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# ---- PEFT's name matching, without regular expressions ---------------------------------------


def _wildcard_equal(pattern: str, text: str) -> bool:
    """`re.fullmatch(pattern, text)` for a pattern of plain characters and `.` (any character)."""
    if len(pattern) != len(text):
        return False
    pos = 0
    for piece in pattern.split("."):
        if not text.startswith(piece, pos):
            return False
        pos += len(piece) + 1
    return True


def matches_pattern_key(key: str, module_name: str) -> bool:
    """PEFT's `re.match(rf"(.*\\.)?({key})$", module_name)` for a key without metacharacters:
    the key matches the whole name, or a suffix of it that starts right after a `.`."""
    start = len(module_name) - len(key)
    if start < 0 or (start > 0 and module_name[start - 1] != "."):
        return False
    return _wildcard_equal(key, module_name[start:])


def pattern_key_for(keys: Iterable[str], module_name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first key, in order, that matches `module_name`."""
    return next((k for k in keys if matches_pattern_key(k, module_name)), None)


def _check_plain(option: str, value: str) -> None:
    bad = sorted(set(value) & _REGEX_METACHARACTERS)
    if bad:
        raise AdapterValidationError(
            f"{option}.{value}" if option in ("rank_pattern", "alpha_pattern") else option,
            f"{_describe(value)} contains regular-expression characters {''.join(bad)!r}; "
            "only module names and dotted paths (e.g. 'q_proj', 'layers.3.mlp.down_proj') are "
            "supported",
        )


# ---- The base model's modules ------------------------------------------------------------------


# The modules of HF's LlamaForCausalLM outside the decoder layers, and a decoder layer's
# modules other than its linear layers.
_MODEL_MODULES = (
    "",
    "model",
    "model.embed_tokens",
    "model.layers",
    "model.norm",
    "model.rotary_emb",
    "lm_head",
)
_LAYER_SUBMODULES = (
    "",
    ".self_attn",
    ".mlp",
    ".mlp.act_fn",
    ".input_layernorm",
    ".post_attention_layernorm",
)


@dataclass(frozen=True)
class ModelModule:
    name: str  # as in the base model, e.g. "model.layers.3.mlp.down_proj"
    layer: int | None  # None for modules outside the decoder layers
    proj: str | None  # one of LINEAR_MODULES, or None for a module LoRA cannot target here


def model_modules(shape: BaseModelShape) -> Iterator[ModelModule]:
    """Every named module of a Llama-family causal LM (HF's names), with what it is."""
    for name in _MODEL_MODULES:
        yield ModelModule(name, None, None)
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}"
        for sub in _LAYER_SUBMODULES:
            yield ModelModule(prefix + sub, layer, None)
        for proj in LINEAR_MODULES:
            yield ModelModule(f"{prefix}.{module_block(proj)}.{proj}", layer, proj)


def _dot_suffixes(name: str) -> Iterator[str]:
    """`name` and each of its suffixes that start right after a `.`."""
    yield name
    pos = name.find(".")
    while pos >= 0:
        yield name[pos + 1 :]
        pos = name.find(".", pos + 1)


# ---- adapter_config.json -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraOptions:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None
    layers_to_transform: frozenset[int] | None
    layers_pattern: tuple[str, ...]
    base_model: str


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_config(config_json: str) -> dict[str, Any]:
    try:
        cfg = loads_bounded(config_json, MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH)
    except JsonBoundsError as exc:
        raise AdapterValidationError(CONFIG_FILE, str(exc)) from exc
    if not isinstance(cfg, dict):
        raise AdapterValidationError(CONFIG_FILE, "must be a JSON object")
    return cfg


def _check_refused_options(cfg: dict[str, Any]) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterValidationError(
            "peft_type", f"only LORA is supported, got {_describe(cfg['peft_type'])}"
        )
    for option in _UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise AdapterValidationError(
                option, f"is set ({_describe(cfg[option])}); not supported"
            )
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterValidationError(
            "bias", f"only 'none' is supported, got {_describe(cfg['bias'])}"
        )
    init = cfg.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PLAIN_INITS):
        raise AdapterValidationError(
            "init_lora_weights",
            f"{_describe(init)} modifies the base weights or the forward; only plain LoRA is "
            "supported (save a PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapter converted to LoRA)",
        )
    for flag in ("use_rslora", "fan_in_fan_out"):
        # fan_in_fan_out may be either: PEFT itself resets it for nn.Linear targets.
        if cfg.get(flag) is not None and not isinstance(cfg[flag], bool):
            raise AdapterValidationError(flag, f"must be true or false, got {_describe(cfg[flag])}")
    # A newer PEFT's option, set, may change the math: refused rather than guessed at.
    known = _INERT_OPTIONS | _HANDLED_OPTIONS | frozenset(_UNSUPPORTED_OPTIONS)
    unknown = sorted(k for k, v in cfg.items() if k not in known and v)
    if unknown:
        raise AdapterValidationError(
            unknown[0], f"unknown option, set ({_describe(cfg[unknown[0]])}); not supported"
        )


def _name_list(cfg: dict[str, Any], option: str) -> str | frozenset[str] | None:
    """A target_modules-style option: None, one string (PEFT: a regex, fully matched), or a list
    of names (PEFT: exact name or dotted suffix)."""
    value = cfg.get(option)
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() != ALL_LINEAR or option != "target_modules":
            _check_plain(option, value)
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterValidationError(option, f"must be a list of names, got {_describe(value)}")
    if len(value) > MAX_PATTERN_ENTRIES:
        raise AdapterValidationError(option, f"{len(value)} entries, over {MAX_PATTERN_ENTRIES}")
    return frozenset(value)


def _pattern_dict(cfg: dict[str, Any], option: str) -> dict[str, Any]:
    value = cfg.get(option) or {}
    if not isinstance(value, dict):
        raise AdapterValidationError(option, "must be an object of pattern -> value")
    if len(value) > MAX_PATTERN_ENTRIES:
        raise AdapterValidationError(option, f"{len(value)} entries, over {MAX_PATTERN_ENTRIES}")
    for key, item in value.items():
        _check_plain(option, key)
        if option == "rank_pattern" and (not _is_int(item) or item <= 0):
            raise AdapterValidationError(
                f"{option}.{key}", f"must be a positive integer, got {_describe(item)}"
            )
        if option == "alpha_pattern" and not _is_number(item):
            raise AdapterValidationError(
                f"{option}.{key}", f"must be a finite number, got {_describe(item)}"
            )
    return dict(value)


def _layer_options(cfg: dict[str, Any]) -> tuple[frozenset[int] | None, tuple[str, ...]]:
    raw_layers, raw_pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    # LoraConfig.__post_init__'s refusals, on the values as written.
    if isinstance(cfg.get("target_modules"), str):
        for option, value in (("layers_to_transform", raw_layers), ("layers_pattern", raw_pattern)):
            if value is not None:
                raise AdapterValidationError(
                    option, "cannot be used when target_modules is a string (PEFT)"
                )
    if raw_pattern and raw_layers is None:
        raise AdapterValidationError("layers_pattern", "needs layers_to_transform (PEFT)")
    layers: frozenset[int] | None = None
    # PEFT: an empty list selects no layers out, like None.
    if raw_layers is not None and raw_layers != []:
        items = [raw_layers] if _is_int(raw_layers) else raw_layers
        if not isinstance(items, list) or not all(_is_int(i) and i >= 0 for i in items):
            raise AdapterValidationError(
                "layers_to_transform",
                f"must be a layer index or a list of them, got {_describe(raw_layers)}",
            )
        layers = frozenset(items)
    patterns = [raw_pattern] if isinstance(raw_pattern, str) else (raw_pattern or [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterValidationError(
            "layers_pattern", f"must be a name or a list of names, got {_describe(raw_pattern)}"
        )
    for item in patterns:
        _check_plain("layers_pattern", item)
    return layers, tuple(patterns)


def parse_config(config_json: str) -> LoraOptions:
    cfg = _load_config(config_json)
    _check_refused_options(cfg)
    r = cfg.get("r", PEFT_DEFAULT_R)
    if not _is_int(r) or r <= 0:
        raise AdapterValidationError("r", f"must be a positive integer, got {_describe(r)}")
    alpha = cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not _is_number(alpha):
        raise AdapterValidationError(
            "lora_alpha", f"must be a finite number, got {_describe(alpha)}"
        )
    targets = _name_list(cfg, "target_modules")
    if targets is None:
        raise AdapterValidationError("target_modules", "missing; name the modules LoRA is on")
    layers, layers_pattern = _layer_options(cfg)
    base_model = cfg.get("base_model_name_or_path") or ""
    return LoraOptions(
        r=r,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=_pattern_dict(cfg, "rank_pattern"),
        alpha_pattern=_pattern_dict(cfg, "alpha_pattern"),
        target_modules=targets,
        exclude_modules=_name_list(cfg, "exclude_modules"),
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        base_model=base_model if isinstance(base_model, str) else str(base_model),
    )


# ---- Which modules the config selects (PEFT's check_target_module_exists) ----------------------


def _excluded(opts: LoraOptions, name: str) -> bool:
    excluded = opts.exclude_modules
    if not excluded:
        return False
    if isinstance(excluded, str):
        return _wildcard_equal(excluded, name)
    return any(s in excluded for s in _dot_suffixes(name))


def _layer_selected(opts: LoraOptions, module: ModelModule) -> bool:
    """PEFT's layers_to_transform test: the index after the first numbered path segment (or
    after a `layers_pattern` segment) must be listed. In Llama names that is the layer."""
    assert opts.layers_to_transform is not None
    if module.layer is None or module.name == f"model.layers.{module.layer}":
        return False  # no "<segment>.<index>." in the name
    if opts.layers_pattern and not any(
        matches_pattern_key(p, "model.layers") for p in opts.layers_pattern
    ):
        return False
    return module.layer in opts.layers_to_transform


def _selected_by(opts: LoraOptions, module: ModelModule) -> str | None:
    """The target_modules entry that selects `module` for LoRA in PEFT, or None."""
    name, targets = module.name, opts.target_modules
    if _excluded(opts, name):
        return None
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return ALL_LINEAR if module.proj is not None else None
        return targets if _wildcard_equal(targets, name) else None
    if name in targets:
        return name
    entry = next((s for s in _dot_suffixes(name) if s in targets), None)
    if entry is not None and opts.layers_to_transform is not None:
        return entry if _layer_selected(opts, module) else None
    return entry


def selected_modules(opts: LoraOptions, shape: BaseModelShape) -> dict[str, ModelModule]:
    """{module name: module} of the linear layers LoRA is on; refuses selections PEFT would
    put LoRA on that we do not serve (lm_head, embeddings), or could not (norms, blocks)."""
    selected: dict[str, ModelModule] = {}
    for module in model_modules(shape):
        entry = _selected_by(opts, module)
        if entry is None:
            continue
        if module.proj is None:
            what = {
                "lm_head": "LoRA on the output head (lm_head) is not supported",
                "model.embed_tokens": "LoRA on embeddings (embed_tokens) is not supported",
            }.get(module.name, "is not a linear layer; LoRA goes on q/k/v/o/gate/up/down_proj")
            raise AdapterValidationError(
                "target_modules", f"{entry!r} selects {module.name}: {what}"
            )
        if module.proj in MLP_MODULES and shape.intermediate_size <= 0:
            raise AdapterValidationError(
                "target_modules", f"{module.proj}: the base model's intermediate_size is unknown"
            )
        selected[module.name] = module
    if not selected:
        raise AdapterValidationError(
            "target_modules",
            f"{_describe(opts.target_modules)} selects no module of the base model (PEFT matches "
            f"a string against whole names such as model.layers.0.self_attn.q_proj)",
        )
    return selected


# ---- adapter_model.safetensors -----------------------------------------------------------------
