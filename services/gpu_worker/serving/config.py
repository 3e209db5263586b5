"""Configuration of one GPU worker (flags `--name`, environment `MANYLORA_NAME`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from services.common.adapter_events import DEFAULT_CHANNEL
from services.common.base_model import DUMMY_PRESETS
from services.common.config import (
    ConfigError,
    check_model_setting,
    host_field,
    log_format_field,
    log_level_field,
    metrics_port_field,
    port_field,
)
from services.common.security_config import CallerSecurityConfig
from services.common.tracing import check_tracing, otel_endpoint_field
from services.gpu_worker.engine.config import EngineConfig

ENGINE_PROCESS_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class WorkerConfig(EngineConfig, CallerSecurityConfig):
    """Serve one base model and its LoRA adapters on one device."""

    # EngineConfig's fields (the engine's settings, first in --help) come before these.

    host: str = host_field()
    port: int = port_field(50051)
    model: str = field(
        default="tiny",
        metadata={
            "help": "local Hugging Face folder (its weights are loaded unless --dummy), or a "
            "dummy preset name (tiny, llama-7b: random weights by nature)"
        },
    )
    dummy: bool = field(
        default=False,
        metadata={"help": "random weights from the folder's config.json and --seed"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the dummy weights"})
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "PEFT folders as id=path or path, or a folder of PEFT folders"},
    )
    adapter_store: str = field(
        default="",
        metadata={"help": "host:port of the adapter store; empty = only --adapters folders"},
    )
    adapter_version_ttl_s: float = field(
        default=5.0,
        metadata={
            "help": "seconds a resolved adapter version is trusted before the store is asked "
            "again; bounds how long a new upload or a delete takes to reach this worker"
        },
    )
    adapter_events_redis_url: str = field(
        default="",
        metadata={
            "help": "Redis the adapter store publishes change notices on (its --redis-url), "
            "for uploads and deletes to take effect at once; empty = only the TTL"
        },
    )
    adapter_events_channel: str = field(
        default=DEFAULT_CHANNEL,
        metadata={"help": "pub/sub channel of those notices: the store's key prefix + events"},
    )
    host_cache_bytes: int = field(
        default=4 << 30, metadata={"help": "host-memory adapter cache bound, in bytes"}
    )
    adapter_fetch_concurrency: int = field(
        default=2,
        metadata={
            "help": "adapter downloads from the store at a time (and threads checking their "
            "sha256); more are queued in the order asked, so the first come soonest; one still "
            "going after 1 s stops counting",
            "min": 1,
        },
    )
    engine_process: str = field(
        default="auto",
        metadata={
            "help": "run the engine in a process of its own (on), or on a thread of the gRPC "
            "server's process (off), which then shares the GIL with every stream; auto = on "
            "with a GPU"
        },
    )
    engine_stall_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "with --engine-process: seconds the engine process may go without a word "
            "(it reports after every step, and twice a second when idle) before it is taken "
            "for frozen, killed, and its requests failed; 0 = never",
            "min": 0,
        },
    )
    stream_interval: int = field(
        default=1,
        metadata={
            "help": "tokens a stream's message waits for (its first token and its end go at "
            "once); 1 = each step's token at once. Larger: fewer messages for the worker's "
            "event loop, the router and the client per token, in coarser pieces",
            "min": 1,
        },
    )
    profile_to: str = field(
        default="",
        metadata={
            "help": "path prefix: when the worker stops, sampled profiles of the engine "
            "thread and of the event loop go to PREFIX.engine.txt and PREFIX.loop.txt (the "
            "costliest functions) and PREFIX.*.txt.folded (stacks for flame graphs); for "
            "diagnosis; empty = off"
        },
    )
    drain_timeout_s: float = field(
        default=25.0,
        metadata={
            "help": "on SIGTERM, seconds the streams already running get to finish (new ones "
            "are refused at once) before they are cut; keep it under the orchestrator's "
            "grace period (compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds)",
            "min": 0,
        },
    )
    log_level: str = log_level_field()
    log_format: str = log_format_field()
    otel_endpoint: str = otel_endpoint_field()
    metrics_port: int = metrics_port_field()
    registry_redis_url: str = field(
        default="",
        metadata={"help": "Redis where the worker registers itself for routers; empty = off"},
    )
    advertise_address: str = field(
        default="", metadata={"help": "host:port routers dial; empty = the bound host and port"}
    )
    heartbeat_interval_s: float = field(
        default=2.0, metadata={"help": "seconds between registrations in Redis"}
    )
    heartbeat_ttl_s: float = field(
        default=6.0, metadata={"help": "seconds a registration lives without a new heartbeat"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # A preset has no weights to load: it is random by nature, whatever --dummy says.
        if self.model in DUMMY_PRESETS:
            object.__setattr__(self, "dummy", True)
        if self.engine_process not in ENGINE_PROCESS_CHOICES:
            raise ConfigError(
                "engine_process",
                f"{self.engine_process!r} is not one of {', '.join(ENGINE_PROCESS_CHOICES)}",
            )

    def engine_config(self) -> EngineConfig:
        """The engine's part of this config."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})

    def engine_in_process(self, device: str) -> bool:
        """Whether the engine runs in its own process, on `device` ("cuda", "cpu")."""
        if self.engine_process == "auto":
            return device == "cuda"
        return self.engine_process == "on"

    def check(self) -> None:
        """What would fail later, deep in start-up: `ConfigError` naming the setting."""
        check_model_setting("model", self.model, need_weights=not self.dummy)
        _check_device(self.device)
        self.check_security()
        check_tracing(self.otel_endpoint)
        if self.adapter_store and self.adapters:
            raise ConfigError("adapters", "give --adapter-store or --adapters, not both")


def _check_device(device: str) -> None:
    import torch  # here: a bad flag elsewhere is told before torch takes seconds to load

    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError("device", f"{device!r} is not one of auto, cpu, cuda, cuda:N")
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "device",
            f"{device!r} asked for, but CUDA is not available here (no visible GPU, or a CPU "
            f"build of torch {torch.__version__}); use --device cpu or auto",
        )
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            "device", f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
        )
