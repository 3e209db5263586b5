"""The front's Prometheus metrics: HTTP requests by route and status, and the per-request
generation metrics every service shares (services/common/metrics.py), seen from here:
time to first token and latencies as an HTTP client gets them, outcomes by finish reason or
gRPC code (CANCELLED for clients that left)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import E2E_BUCKETS, PREFIX, GenerationMetrics

# Status recorded for a client that left before its response was complete (nginx's).
CLIENT_CLOSED = 499


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.generation = GenerationMetrics(self.registry)
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests answered, by route and status (499: the client left).",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Seconds from an HTTP request's arrival to the end of its response.",
            ["route"],
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            PREFIX + "num_requests_running",
            "Generation requests this front is relaying now.",
            registry=self.registry,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)
