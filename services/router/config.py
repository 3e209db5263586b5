"""Settings of one router replica, filled by `services.common.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import (
    ConfigError,
    host_field,
    log_format_field,
    log_level_field,
    metrics_port_field,
    port_field,
)
from services.common.security_config import CallerSecurityConfig
from services.common.tracing import check_tracing, otel_endpoint_field
from services.common.worker_record import REGISTRY_PREFIX


@dataclass(frozen=True)
class RouterConfig(CallerSecurityConfig):
    """manylora router: validates, queues and routes Generate calls to GPU workers."""

    host: str = host_field()
    port: int = port_field(50050)
    workers: list[str] = field(
        default_factory=list, metadata={"help": "worker addresses host:port, comma-separated"}
    )
    registry_redis_url: str = field(
        default="",
        metadata={"help": "Redis where workers register themselves (heartbeats); empty = off"},
    )
    registry_prefix: str = field(
        default=REGISTRY_PREFIX, metadata={"help": "key prefix of worker registrations"}
    )
    adapter_store: str = field(
        default="",
        metadata={"help": "host:port of the adapter store (adapter checks, ListAdapters)"},
    )
    model: str = field(
        default="", metadata={"help": "route only to workers serving this model; empty = any"}
    )
    max_running: int = field(
        default=256, metadata={"help": "requests relayed to workers at once", "min": 1}
    )
    max_queued: int = field(
        default=512,
        metadata={"help": "requests waiting for a running slot; beyond it RESOURCE_EXHAUSTED"},
    )
    load_bound: float = field(
        default=1.25,
        metadata={"help": "a worker takes at most this times the average load (>= 1)"},
    )
    min_load_bound: int = field(
        default=4,
        metadata={
            "help": "a worker under this many requests keeps its adapters' requests whatever "
            "the average (batching them costs little; loading adapters elsewhere does)"
        },
    )
    health_interval_s: float = field(
        default=1.0, metadata={"help": "seconds between health and stats polls of each worker"}
    )
    health_timeout_s: float = field(
        default=1.0, metadata={"help": "a poll slower than this counts as failed"}
    )
    worker_liveness_timeout_s: float = field(
        default=6.0,
        metadata={
            "help": "a worker with streams in flight that answers no keepalive ping for about "
            "this long (frozen, or its host gone) is taken as dead: its streams end with "
            "UNAVAILABLE and it gets no work until a health poll finds it again (>= 2)"
        },
    )
    adapter_cache_ttl_s: float = field(
        default=5.0, metadata={"help": "seconds the store's answer about an adapter is reused"}
    )
    metrics_port: int = metrics_port_field()
    metrics_adapter_labels: int = field(
        default=64,
        metadata={
            "help": "adapters with per-adapter metrics series of their own (the first that "
            "succeed); the rest count as (other)",
            "min": 0,
        },
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()
    otel_endpoint: str = otel_endpoint_field()

    def check(self) -> None:
        """Settings that cannot work: `ConfigError` naming the first one."""
        if self.load_bound < 1:
            raise ConfigError("load_bound", f"must be >= 1, got {self.load_bound:g}")
        if not self.workers and not self.registry_redis_url:
            raise ConfigError(
                "workers", "give --workers or --registry-redis-url (or both): no way to find one"
            )
        for address in (*self.workers, self.adapter_store):
            if address and not _is_host_port(address):
                field_name = "adapter_store" if address == self.adapter_store else "workers"
                raise ConfigError(field_name, f"{address!r} is not host:port")
        self.check_security()
        check_tracing(self.otel_endpoint)


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
