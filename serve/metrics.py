"""Prometheus metrics of one server (its own registry, so two apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests, latency per model and endpoint, batch sizes, queue depth, rejections."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("enginekit_requests", "HTTP requests answered", ["model", "endpoint", "code"],
                                registry=self.registry)
        self.latency = Histogram("enginekit_request_seconds", "Time to answer a request", ["model", "endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("enginekit_batch_size", "Images per engine call of a classifier", ["model"],
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("enginekit_queue_depth", "Requests waiting per model", ["model"],
                                 registry=self.registry)
        self.rejections = Counter("enginekit_rejections", "Requests refused or abandoned", ["model", "reason"],
                                  registry=self.registry)
        self.in_flight = Gauge("enginekit_in_flight", "Requests being answered", registry=self.registry)
        self.model_ready = Gauge("enginekit_model_ready", "1 when the model is loaded and warm", ["model"],
                                 registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
