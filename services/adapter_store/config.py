"""Settings of the adapter store, filled by `services.common.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdapterStoreConfig:
    """manylora adapter store: upload, validate, store (disk + Redis) and serve LoRA adapters."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50052, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=0, metadata={"help": "port of the Prometheus /metrics endpoint; 0 = off"}
    )
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
        metadata={"help": "byte budget of the hot copy in Redis; least recently used go first"},
    )
    redis_key_prefix: str = field(
        default="manylora:store:", metadata={"help": "prefix of every Redis key the store owns"}
    )
    redis_retry_s: float = field(
        default=2.0, metadata={"help": "seconds between reconnection attempts while Redis is down"}
    )
    max_rank: int = field(default=128, metadata={"help": "largest LoRA rank accepted"})
    base_model: str = field(
        default="tiny",
        metadata={"help": "dummy preset name or local Hugging Face folder to validate against"},
    )
    fetch_chunk_bytes: int = field(
        default=2 << 20, metadata={"help": "bytes per FetchAdapter message"}
    )
    max_upload_bytes: int = field(
        default=2 << 30, metadata={"help": "largest adapter_model.safetensors accepted"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
