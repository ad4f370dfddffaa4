"""Per-route and per-step metrics of an integration context, exposed in Prometheus text.

Every route and every step has one :class:`Series` of plain numbers (exchanges, failures,
a latency histogram), updated without locks on the event loop and turned into metric
families only when ``/metrics`` is scraped, as the gateway's request series are.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["BOUNDS", "CONTENT_TYPE_LATEST", "IntegrationMetrics", "Series"]

# In-memory steps take microseconds, broker and HTTP calls milliseconds to seconds.
_BUCKETS = (
    0.0001,
    0.00025,
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
#: Upper bounds of the histogram buckets; a value counts in the first bound >= it.
BOUNDS = _BOUNDS = (*_BUCKETS, float("inf"))
_LE = tuple(floatToGoString(b) for b in _BOUNDS)

_ROUTE = "meshgate_integration_route"
_STEP = "meshgate_integration_step"


class Series:
    """Exchanges, failures and latency of one route or one step."""

    __slots__ = ("failures", "counts", "sum")

    def __init__(self) -> None:
        self.failures = 0
        self.counts = [0] * len(_BOUNDS)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """An exchange done in ``seconds``; a failed one also adds to ``failures``."""
        # The first bucket whose bound is >= the value, as Histogram.observe counts.
        self.counts[bisect_left(_BOUNDS, seconds)] += 1
        self.sum += seconds

    @property
    def exchanges(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0.0
        out: list[tuple[str, float]] = []
        for le, n in zip(_LE, self.counts, strict=True):
            cumulative += n
            out.append((le, cumulative))
        return out


_Families = tuple[CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily]


def _families(prefix: str, what: str, labels: list[str]) -> _Families:
    return (
        CounterMetricFamily(f"{prefix}_exchanges", f"Exchanges {what} processed.", labels=labels),
        CounterMetricFamily(
            f"{prefix}_failures",
            f"Exchanges that failed in {what}.",
            labels=labels,
        ),
        HistogramMetricFamily(
            f"{prefix}_duration_seconds",
            f"Time an exchange spent in {what}, redeliveries included.",
            labels=labels,
        ),
    )


def _add(families: _Families, labels: list[str], series: Series) -> None:
    exchanges, failures, seconds = families
    buckets = series.buckets()
    exchanges.add_metric(labels, buckets[-1][1])
    failures.add_metric(labels, float(series.failures))
    seconds.add_metric(labels, buckets, series.sum)


class _Collector(Collector):
    def __init__(self, metrics: IntegrationMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return [
            *_families(_ROUTE, "a route", ["route"]),
            *_families(_STEP, "a step", ["route", "step"]),
        ]

    def collect(self) -> Iterator[Metric]:
        routes = _families(_ROUTE, "a route", ["route"])
        steps = _families(_STEP, "a step", ["route", "step"])
        # list(): a snapshot, should a scrape run beside a route being added.
        for route_id, series in list(self.metrics.routes.items()):
            _add(routes, [route_id], series)
        for (route_id, where), series in list(self.metrics.steps.items()):
            _add(steps, [route_id, where], series)
        yield from routes
        yield from steps


class IntegrationMetrics:
    """The series of one context's routes and steps, by route id and step path."""

    def __init__(self) -> None:
        self.routes: dict[str, Series] = {}
        self.steps: dict[tuple[str, str], Series] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def route(self, route_id: str) -> Series:
        series = self.routes.get(route_id)
        if series is None:
            series = self.routes[route_id] = Series()
        return series

    def step(self, route_id: str, where: str) -> Series:
        """The series of the step at ``where`` (``steps[2].choice.when[0].steps[1].to``)."""
        key = (route_id, where)
        series = self.steps.get(key)
        if series is None:
            series = self.steps[key] = Series()
        return series

    def forget(self, route_id: str) -> None:
        """Drop the series of a removed route and its steps (a redefined one starts anew)."""
        self.routes.pop(route_id, None)
        for key in [k for k in self.steps if k[0] == route_id]:
            del self.steps[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)
