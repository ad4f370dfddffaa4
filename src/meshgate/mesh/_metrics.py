"""The sidecar's Prometheus metrics, named and labelled as Istio's standard metrics.

``istio_requests_total``, ``istio_request_duration_milliseconds``, ``istio_request_bytes``,
``istio_response_bytes`` and the ``istio_tcp_*`` series, reported by the caller's sidecar
(``reporter="source"``) and the callee's (``reporter="destination"``), so that dashboards
made for Istio read a meshgate mesh. Counts are plain numbers updated without locks and
turned into metric families at scrape time (one process, one thread on the hot path).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["MeshMetrics", "REQUEST_LABELS"]

# Istio's default duration buckets, in milliseconds.
_MS_BOUNDS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
    float("inf"),
)
_BYTE_BOUNDS = (*(float(10**i) for i in range(9)), float("inf"))

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_version",
    "destination_service",
    "destination_service_name",
    "destination_workload",
    "destination_version",
    "request_protocol",
    "response_code",
    "response_flags",
)
_TCP_LABELS = (
    "reporter",
    "source_workload",
    "destination_service",
    "destination_service_name",
    "destination_workload",
)


class _Histogram:
    __slots__ = ("counts", "sum", "bounds", "le")

    def __init__(self, bounds: tuple[float, ...], le: tuple[str, ...]) -> None:
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.bounds = bounds
        self.le = le

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for le, n in zip(self.le, self.counts, strict=True):
            total += n
            out.append((le, float(total)))
        return out


_MS_LE = tuple(floatToGoString(b) for b in _MS_BOUNDS)
_BYTE_LE = tuple(floatToGoString(b) for b in _BYTE_BOUNDS)


class _Request:
    """One label set's request series."""

    __slots__ = ("count", "duration", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.count = 0
        self.duration = _Histogram(_MS_BOUNDS, _MS_LE)
        self.request_bytes = _Histogram(_BYTE_BOUNDS, _BYTE_LE)
        self.response_bytes = _Histogram(_BYTE_BOUNDS, _BYTE_LE)


class _Tcp:
    __slots__ = ("opened", "closed", "sent", "received")

    def __init__(self) -> None:
        self.opened = self.closed = self.sent = self.received = 0


class _Series(Collector):
    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], _Request] = {}
        self.tcp: dict[tuple[str, ...], _Tcp] = {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = list(REQUEST_LABELS)
        total = CounterMetricFamily(
            "istio_requests", "Requests, by source and destination.", labels=labels
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds", "Request duration.", labels=labels
        )
        request_bytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body sizes.", labels=labels
        )
        response_bytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body sizes.", labels=labels
        )
        for key, series in list(self.requests.items()):
            values = list(key)
            total.add_metric(values, float(series.count))
            duration.add_metric(values, series.duration.buckets(), series.duration.sum)
            request_bytes.add_metric(
                values, series.request_bytes.buckets(), series.request_bytes.sum
            )
            response_bytes.add_metric(
                values, series.response_bytes.buckets(), series.response_bytes.sum
            )
        yield from (total, duration, request_bytes, response_bytes)
        tcp_labels = list(_TCP_LABELS)
        families = {
            "opened": CounterMetricFamily(
                "istio_tcp_connections_opened", "TCP connections opened.", labels=tcp_labels
            ),
            "closed": CounterMetricFamily(
                "istio_tcp_connections_closed", "TCP connections closed.", labels=tcp_labels
            ),
            "sent": CounterMetricFamily(
                "istio_tcp_sent_bytes", "Bytes sent to the client.", labels=tcp_labels
            ),
            "received": CounterMetricFamily(
                "istio_tcp_received_bytes", "Bytes received from the client.", labels=tcp_labels
            ),
        }
        for key, tcp in list(self.tcp.items()):
            values = list(key)
            for name, family in families.items():
                family.add_metric(values, float(getattr(tcp, name)))
        yield from families.values()


class MeshMetrics:
    """A sidecar's metrics: Istio's standard ones, and the mesh's own (retries, ejections)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._series = _Series()
        r.register(self._series)
        self.retries = Counter(
            "meshgate_mesh_retries",
            "Retries sent, by destination service.",
            ["service"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "meshgate_mesh_retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent.",
            ["service"],
            registry=r,
        )
        self.overflows = Counter(
            "meshgate_mesh_overflows",
            "Requests refused at once because the service had max_requests in flight (503).",
            ["service"],
            registry=r,
        )
        self.ejections = Counter(
            "meshgate_mesh_ejections",
            "Instances ejected by outlier detection.",
            ["service"],
            registry=r,
        )
        self.endpoints = Gauge(
            "meshgate_mesh_endpoints",
            "Instances known per service, healthy or ejected.",
            ["service", "state"],
            registry=r,
        )
        self.mirrored = Counter(
            "meshgate_mesh_mirrored", "Requests copied to a mirror.", ["service"], registry=r
        )
        self.faults = Counter(
            "meshgate_mesh_faults", "Faults injected, by kind.", ["service", "kind"], registry=r
        )
        self.config_updates = Counter(
            "meshgate_mesh_config_updates",
            "Configurations applied, by result.",
            ["result"],
            registry=r,
        )

    def request(
        self, labels: tuple[str, ...], duration_ms: float, bytes_in: int, bytes_out: int
    ) -> None:
        series = self._series.requests.get(labels)
        if series is None:
            series = self._series.requests[labels] = _Request()
        series.count += 1
        series.duration.observe(duration_ms)
        series.request_bytes.observe(bytes_in)
        series.response_bytes.observe(bytes_out)

    def tcp(self, labels: tuple[str, ...]) -> _Tcp:
        series = self._series.tcp.get(labels)
        if series is None:
            series = self._series.tcp[labels] = _Tcp()
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)
