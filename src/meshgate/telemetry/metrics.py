"""Prometheus metrics of the data plane, with label children cached for the hot path."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
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
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
_LE = tuple(floatToGoString(b) for b in _BOUNDS)

_REQUESTS = ("meshgate_requests", "Requests answered, by product, application and status class.")
_REQUEST_SECONDS = (
    "meshgate_request_duration_seconds",
    "Time from the request head to the last response byte.",
)
_UPSTREAM_SECONDS = (
    "meshgate_upstream_duration_seconds",
    "Time from forwarding to the upstream's response head.",
)


class _Histogram:
    """One label set's bucket counts (not cumulative) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0


class _RequestSeries(Collector):
    """The three per-request series as plain numbers, turned into metrics at scrape time.

    prometheus_client takes a lock per update; a single process needs none. The
    exposition is the one of the equivalent Counter and Histograms.
    """

    def __init__(self) -> None:
        # Label values -> value, in first-use order like prometheus_client's children.
        self.requests: dict[tuple[str, str, str], list[int]] = {}
        self.request_seconds: dict[str, _Histogram] = {}
        self.upstream_seconds: dict[str, _Histogram] = {}

    def describe(self) -> list[Metric]:
        return [*self._families()]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(*_REQUESTS, labels=["product", "application", "status_class"]),
            HistogramMetricFamily(*_REQUEST_SECONDS, labels=["product"]),
            HistogramMetricFamily(*_UPSTREAM_SECONDS, labels=["product"]),
        )

    def collect(self) -> Iterator[Metric]:
        requests, request_seconds, upstream_seconds = self._families()
        # list(): a snapshot, should a scrape ever run beside an update in another thread.
        for labels, count in list(self.requests.items()):
            requests.add_metric(labels, float(count[0]))
        yield requests
        for family, series in (
            (request_seconds, self.request_seconds),
            (upstream_seconds, self.upstream_seconds),
        ):
            for product, histogram in list(series.items()):
                buckets: list[tuple[str, float]] = []
                total = 0.0
                for le, n in zip(_LE, histogram.counts, strict=True):
                    total += n
                    buckets.append((le, total))
                family.add_metric([product], buckets, histogram.sum)
            yield family


class GatewayMetrics:
    """The gateway's metrics. One instance per process; survives configuration reloads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Multiprocess mode writes every update to files shared by the workers: only
        # prometheus_client's own metrics do that.
        self._series: _RequestSeries | None = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.requests = Counter(
                *_REQUESTS, ["product", "application", "status_class"], registry=r
            )
            self.request_seconds = Histogram(
                *_REQUEST_SECONDS, ["product"], buckets=_LATENCY_BUCKETS, registry=r
            )
            self.upstream_seconds = Histogram(
                *_UPSTREAM_SECONDS, ["product"], buckets=_LATENCY_BUCKETS, registry=r
            )
        else:
            self._series = _RequestSeries()
            r.register(self._series)
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
            children = self._children[key] = self._new_children(product, application, status)
        if self._series is None:
            children[0].inc()
            children[1].observe(duration)
            if upstream is not None:
                children[2].observe(upstream)
            return
        children[0][0] += 1
        histogram = children[1]
        # The first bucket whose bound is >= the value, as Histogram.observe counts.
        if duration == duration:
            histogram.counts[bisect_left(_BOUNDS, duration)] += 1
        histogram.sum += duration
        if upstream is not None:
            histogram = children[2]
            if upstream == upstream:
                histogram.counts[bisect_left(_BOUNDS, upstream)] += 1
            histogram.sum += upstream

    def _new_children(self, product: str, application: str, status: int) -> tuple[Any, Any, Any]:
        """The series one (product, application, status class) updates, created on first use."""
        status_class = _STATUS_CLASS.get(status // 100, "other")
        series = self._series
        if series is None:
            return (
                self.requests.labels(product, application, status_class),
                self.request_seconds.labels(product),
                self.upstream_seconds.labels(product),
            )
        count = series.requests.setdefault((product, application, status_class), [0])
        request_seconds = series.request_seconds.get(product)
        if request_seconds is None:
            request_seconds = series.request_seconds[product] = _Histogram()
        upstream_seconds = series.upstream_seconds.get(product)
        if upstream_seconds is None:
            upstream_seconds = series.upstream_seconds[product] = _Histogram()
        return count, request_seconds, upstream_seconds

    def render(self) -> bytes:
        """The Prometheus text exposition, across worker processes when there are several."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            return generate_latest(registry)
        return generate_latest(self.registry)
