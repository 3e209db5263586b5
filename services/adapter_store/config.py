"""Settings of the adapter store, filled by `services.common.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import (
    ConfigError,
    check_model_setting,
    host_field,
    log_format_field,
    log_level_field,
    metrics_port_field,
    port_field,
)
from services.common.security_config import ServerSecurityConfig
from services.common.tracing import check_tracing, otel_endpoint_field

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
STORE_DTYPES = ("as-uploaded", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class AdapterStoreConfig(ServerSecurityConfig):
    """manylora adapter store: upload, validate, store (disk + Redis) and serve LoRA adapters."""

    host: str = host_field()
    port: int = port_field(50052)
    metrics_port: int = metrics_port_field()
    data_dir: str = field(
        default="./.run/adapters",
        metadata={"help": "folder holding one sub-folder per adapter and version"},
    )
    redis_url: str = field(
        default="",
        metadata={
            "help": "Redis for the hot copy, e.g. redis://127.0.0.1:6379/0; empty: disk only"
        },
    )
    redis_max_bytes: int = field(
        default=1 << 30,
        metadata={
            "help": "byte budget of the hot copy in Redis; least recently used go first",
            "min": 0,
        },
    )
    redis_key_prefix: str = field(
        default="manylora:store:", metadata={"help": "prefix of every Redis key the store owns"}
    )
    redis_retry_s: float = field(
        default=2.0,
        metadata={
            "help": "seconds between probes of Redis (its health, and reconnection while down)",
            "min": 0.01,
        },
    )
    max_rank: int = field(default=128, metadata={"help": "largest LoRA rank accepted", "min": 1})
    store_dtype: str = field(
        default="as-uploaded",
        metadata={
            "help": "dtype adapters are stored and served in: as uploaded, or converted at "
            "upload (bfloat16 halves an fp32 upload, and what each worker downloads, hashes "
            "and parses; a GPU worker's bf16 engine converts to it anyway)",
            "choices": STORE_DTYPES,
        },
    )
    base_model: str = field(
        default="tiny",
        metadata={"help": "dummy preset name or local Hugging Face folder to validate against"},
    )
    fetch_chunk_bytes: int = field(
        default=2 << 20,
        metadata={"help": "bytes per FetchAdapter message", "min": 1, "max": 32 << 20},
    )
    max_upload_bytes: int = field(
        default=2 << 30,
        metadata={"help": "largest adapter_model.safetensors accepted", "min": 1},
    )
    max_upload_bytes_in_flight: int = field(
        default=2 << 30,
        metadata={
            "help": "bytes of all uploads in progress together (validation holds an upload in "
            "memory, at a few times its size); beyond it RESOURCE_EXHAUSTED",
            "min": 1,
        },
    )
    upload_idle_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "an upload silent this long is dropped (and gives back its budget)",
            "min": 0.01,
        },
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()
    otel_endpoint: str = otel_endpoint_field()

    def check(self) -> None:
        """Settings that cannot work together or point at nothing; `ConfigError` naming one."""
        check_model_setting("base_model", self.base_model)
        self.check_security()
        check_tracing(self.otel_endpoint)
        if self.max_upload_bytes > self.max_upload_bytes_in_flight:
            raise ConfigError(
                "max_upload_bytes",
                f"{self.max_upload_bytes} is above --max-upload-bytes-in-flight "
                f"({self.max_upload_bytes_in_flight}): such an upload could never start",
            )
        if self.redis_url and not self.redis_url.startswith(_REDIS_SCHEMES):
            raise ConfigError(
                "redis_url", f"{self.redis_url!r} does not start with {', '.join(_REDIS_SCHEMES)}"
            )
