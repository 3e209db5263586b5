"""The router's Prometheus metrics: the per-request ones every service shares, its queue, its
view of the workers, and how often adapter affinity placed a request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.metrics import PREFIX, GenerationMetrics
from services.router.admission import Admission
from services.router.worker_pool import WorkerPool


class RouterMetrics:
    def __init__(self, admission: Admission, pool: WorkerPool):
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
