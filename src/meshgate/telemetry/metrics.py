"""Prometheus metrics of the data plane, with label children cached for the hot path."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double the exposition for no operational use.
disable_created_metrics()

__all__ = ["GatewayMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_STATUS_CLASS = {i: f"{i}xx" for i in range(1, 6)}


class GatewayMetrics:
    """The gateway's metrics. One instance per process; survives configuration reloads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshgate_requests",
            "Requests answered, by product, application and status class.",
            ["product", "application", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "meshgate_request_duration_seconds",
            "Time from the request head to the last response byte.",
            ["product"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "meshgate_upstream_duration_seconds",
            "Time from forwarding to the upstream's response head.",
            ["product"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.limit_rejections = Counter(
            "meshgate_limit_rejections",
            "Requests refused by a plan limit (429).",
            ["product", "application", "metric", "period"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "meshgate_upstream_errors",
            "Exchanges where the upstream failed (connect, timeout, broken response).",
            ["product", "status"],
            registry=r,
        )
        self.backend_errors = Counter(
            "meshgate_counter_backend_errors",
            "Requests during which the counter backend could not be reached.",
            ["policy"],
            registry=r,
        )
        self.reloads = Counter(
            "meshgate_config_reloads",
            "Configuration reloads, by result.",
            ["result"],
            registry=r,
        )
        self.config_products = Gauge(
            "meshgate_config_products",
            "Products in the configuration being served.",
            registry=r,
            multiprocess_mode="max",
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def observe(
        self,
        product: str,
        application: str,
        status: int,
        duration: float,
        upstream: float | None,
    ) -> None:
        key = (product, application, status // 100)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(
                    product, application, _STATUS_CLASS.get(status // 100, "other")
                ),
                self.request_seconds.labels(product),
                self.upstream_seconds.labels(product),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(duration)
        if upstream is not None:
            children[2].observe(upstream)

    def render(self) -> bytes:
        """The Prometheus text exposition, across worker processes when there are several."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry)
        return generate_latest(self.registry)
