"""Settings of the OpenAI-compatible HTTP front, filled by `services.common.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ConfigError, host_field, log_level_field, metrics_port_field
from services.common.security_config import check_tls_pair, check_tls_setting
from services.common.tls import ClientTls, check_ca


@dataclass(frozen=True)
class OpenAIFrontConfig:
    """manylora OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions and
    /v1/models, served over a router's gRPC API."""

    host: str = host_field()
    port: int = field(
        default=8000,
        metadata={"help": "HTTP port (0 picks a free one)", "min": 0, "max": 65535},
    )
    router: str = field(
        default="127.0.0.1:50050", metadata={"help": "host:port of the router to call"}
    )
    tls_ca_file: str = field(
        default="",
        metadata={
            "help": "PEM CA that signs the router's certificate; given = the front calls the "
            "router over TLS; empty = plaintext"
        },
    )
    tls_cert_file: str = field(
        default="",
        metadata={"help": "certificate the front presents to a router that asks (mutual TLS)"},
    )
    tls_key_file: str = field(default="", metadata={"help": "private key of --tls-cert-file"})
    model: str = field(
        default="tiny",
        metadata={
            "help": "the base model's name as clients give it in `model` (the workers' --model); "
            "any other name is taken as an adapter id, `id@N` pinning version N"
        },
    )
    request_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": "deadline of one generation, passed to the router (past it: 504)",
            "min": 0.001,
        },
    )
    default_max_tokens: int = field(
        default=0,
        metadata={
            "help": "max_tokens of a chat request that gives none; 0 = up to the model's "
            "context length, as OpenAI's API (completions default to 16, as OpenAI's do)",
            "min": 0,
            "max": (1 << 32) - 1,
        },
    )
    max_body_bytes: int = field(
        default=8 << 20,
        metadata={"help": "largest request body accepted (413 beyond)", "min": 1024},
    )
    metrics_port: int = metrics_port_field()
    log_level: str = log_level_field()

    def check(self) -> None:
        """Settings that cannot work: `ConfigError` naming the first one."""
        host, _, port = self.router.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("router", f"{self.router!r} is not host:port")
        if not self.model:
            raise ConfigError("model", "give the base model's name")
        if (self.tls_cert_file or self.tls_key_file) and not self.tls_ca_file:
            raise ConfigError("tls_ca_file", "a client certificate needs TLS: give --tls-ca-file")
        check_tls_pair(self.tls_cert_file, self.tls_key_file)
        if self.tls_ca_file:
            check_tls_setting("tls_ca_file", lambda: check_ca(self.tls_ca_file))

    def router_tls(self) -> ClientTls | None:
        """How the front reaches the router: TLS when --tls-ca-file is given."""
        if not self.tls_ca_file:
            return None
        return ClientTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
