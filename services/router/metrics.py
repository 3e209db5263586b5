"""The router's Prometheus metrics: the per-request ones every service shares, its queue, its
view of the workers, how often adapter affinity placed a request, and requests and tokens
per adapter (under bounded labels: services.common.metrics.BoundedLabels)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.metrics import PREFIX, BoundedLabels, GenerationMetrics
from services.router.admission import Admission
from services.router.request_summary import RequestSummary
from services.router.worker_pool import WorkerPool

# Adapters with series of their own (RouterConfig.metrics_adapter_labels).
DEFAULT_ADAPTER_LABELS = 64


class RouterMetrics:
    def __init__(
        self, admission: Admission, pool: WorkerPool, adapter_labels: int = DEFAULT_ADAPTER_LABELS
    ):
        self.registry = CollectorRegistry()
        self.generation = GenerationMetrics(self.registry)
        running = Gauge(
            PREFIX + "num_requests_running",
            "Requests this router is relaying to workers.",
            registry=self.registry,
        )
        running.set_function(lambda: admission.running)
        waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Requests in this router's queue.",
            registry=self.registry,
        )
        waiting.set_function(lambda: admission.queued)
        workers = Gauge(
            PREFIX + "router_workers",
            "Workers known to this router, by state.",
            ["state"],
            registry=self.registry,
        )
        workers.labels("healthy").set_function(lambda: pool.counts()[0])
        workers.labels("unavailable").set_function(lambda: pool.counts()[1] - pool.counts()[0])
        self.routed = Counter(
            PREFIX + "router_routed_requests",
            "Requests sent to a worker, by where it held the adapter (gpu, host, none, base).",
            ["affinity"],
            registry=self.registry,
        )
        self.retries = Counter(
            PREFIX + "router_retries",
            "Requests sent again to another worker after the first failed before any token.",
            registry=self.registry,
        )
        self.adapter_labels = BoundedLabels(adapter_labels)
        self.adapter_requests = Counter(
            PREFIX + "adapter_requests",
            "Generate requests by adapter (the first few that succeed; the rest as (other), "
            "none as (base)) and by how they ended (OK or the gRPC code).",
            ["adapter", "code"],
            registry=self.registry,
        )
        self.adapter_prompt_tokens = Counter(
            PREFIX + "adapter_prompt_tokens",
            "Prompt tokens of finished requests, by adapter label.",
            ["adapter"],
            registry=self.registry,
        )
        self.adapter_generation_tokens = Counter(
            PREFIX + "adapter_generation_tokens",
            "Tokens generated, by adapter label.",
            ["adapter"],
            registry=self.registry,
        )

    def track(self) -> RequestSummary:
        """Follows one Generate stream: the shared metrics, the per-adapter ones, and its
        summary line in the log."""
        return RequestSummary(self.generation.track(), self._count_adapter)

    def _count_adapter(self, adapter_id: str, status: str, prompt: int, generated: int) -> None:
        label = self.adapter_labels.label(adapter_id, succeeded=status == "OK")
        self.adapter_requests.labels(label, status).inc()
        if prompt:
            self.adapter_prompt_tokens.labels(label).inc(prompt)
        if generated:
            self.adapter_generation_tokens.labels(label).inc(generated)
