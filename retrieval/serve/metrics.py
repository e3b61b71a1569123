"""Prometheus metrics of one server (a registry of its own, so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, in_flight) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("crossmodal_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.errors = Counter("crossmodal_errors", "Requests answered with 5xx (our faults)", ["route"],
                              registry=self.registry)
        self.latency = Histogram("crossmodal_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stages = Histogram("crossmodal_query_stage_seconds", "Time a query spent per stage",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("crossmodal_queue_depth", "Queries running or waiting for a worker",
                           registry=self.registry)
        self.queue.set_function(in_flight)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 500:
            self.errors.labels(route).inc()

    def query(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000)

    def text(self) -> bytes:
        return generate_latest(self.registry)
