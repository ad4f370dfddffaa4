"""The sidecar's Prometheus metrics, named and labelled as Istio's standard metrics.

``istio_requests_total``, ``istio_request_duration_milliseconds``, ``istio_request_bytes``,
``istio_response_bytes`` and the ``istio_tcp_*`` series, reported by the caller's sidecar
(``reporter="source"``) and the callee's (``reporter="destination"``), so that dashboards
made for Istio read a meshgate mesh. Counts are plain numbers updated without locks (one
process, one thread on the hot path) and written out in the Prometheus text format at
scrape time. The format is written here rather than by prometheus_client: a sidecar's
memory budget (40 MB beside every instance) has no room for the library's megabyte and a
half, and the sidecar needs nothing else of it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from meshgate.config.edges import DURATION_BOUNDS_MS

__all__ = ["CONTENT_TYPE", "MeshMetrics", "REQUEST_LABELS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request series kept at most; later label sets are counted together as "other".
MAX_SERIES = 10_000

# Istio's default duration buckets, in milliseconds.
_MS_BOUNDS = DURATION_BOUNDS_MS
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
    "connection_security_policy",
    "consumer_application",
    "consumer_plan",
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


def _number(value: float) -> str:
    """A sample value or bound as Prometheus writes it (+Inf, 1.0, 2.5e+06)."""
    if value == float("inf"):
        return "+Inf"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}.0"
    return repr(float(value))


_MS_LE = tuple(_number(b) for b in _MS_BOUNDS)
_BYTE_LE = tuple(_number(b) for b in _BYTE_BOUNDS)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class Family:
    """A counter or gauge with labels: ``family.labels(*values).inc()``."""

    def __init__(self, name: str, help: str, labels: Iterable[str], kind: str = "counter"):
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self.kind = kind
        self.children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child()
        return child

    def render(self, out: list[str]) -> None:
        sample = self.name + "_total" if self.kind == "counter" else self.name
        out.append(f"# HELP {sample} {self.help}\n# TYPE {sample} {self.kind}\n")
        for values, child in list(self.children.items()):
            out.append(f"{sample}{_labels(self.label_names, values)} {_number(child.value)}\n")


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


def _render_histogram(
    out: list[str], name: str, label_names: tuple[str, ...], values: tuple[str, ...], h: _Histogram
) -> None:
    total = 0
    for le, n in zip(h.le, h.counts, strict=True):
        total += n
        labels = _labels(label_names, values, f'le="{le}"')
        out.append(f"{name}_bucket{labels} {total}.0\n")
    plain = _labels(label_names, values)
    out.append(f"{name}_count{plain} {total}.0\n{name}_sum{plain} {_number(h.sum)}\n")


class MeshMetrics:
    """A sidecar's metrics: Istio's standard ones, and the mesh's own (retries, ejections).

    ``gauges`` are read when scraped (endpoint counts and ejections come from the clusters
    as they are then)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], _Request] = {}
        self.tcp_series: dict[tuple[str, ...], _Tcp] = {}
        self.retries = Family(
            "meshgate_mesh_retries", "Retries sent, by destination service.", ["service"]
        )
        self.retry_budget_exhausted = Family(
            "meshgate_mesh_retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent.",
            ["service"],
        )
        self.overflows = Family(
            "meshgate_mesh_overflows",
            "Requests refused at once because the service had max_requests in flight (503).",
            ["service"],
        )
        self.mirrored = Family(
            "meshgate_mesh_mirrored", "Requests copied to a mirror.", ["service"]
        )
        self.faults = Family(
            "meshgate_mesh_faults", "Faults injected, by kind.", ["service", "kind"]
        )
        self.config_updates = Family(
            "meshgate_mesh_config_updates", "Configurations applied, by result.", ["result"]
        )
        self.mtls_handshakes = Family(
            "meshgate_mesh_mtls_handshakes",
            "Mutual TLS connections established and their peer accepted, by direction.",
            ["direction"],
        )
        self.mtls_failures = Family(
            "meshgate_mesh_mtls_failures",
            "Connections refused for mutual TLS, by direction and reason (plaintext to a "
            "strict service, expired, untrusted, trust-domain, peer-identity, ...).",
            ["direction", "reason"],
        )
        self.inbound_connections = Family(
            "meshgate_mesh_inbound_connections",
            "Inbound connections served, by connection_security_policy (mutual_tls, none).",
            ["connection_security_policy"],
        )
        self.authz = Family(
            "meshgate_mesh_authz",
            "Authorization decisions on the inbound side, by policy, action and result.",
            ["service", "policy", "action", "result"],
        )
        self.consumer_tokens = Family(
            "meshgate_mesh_consumer_tokens",
            "Consumer tokens received on the inbound side, by result: valid, expired "
            "(refused, 401), invalid (removed) or unverified (removed: no identity).",
            ["result"],
        )
        self.counters = [
            self.authz,
            self.consumer_tokens,
            self.retries,
            self.retry_budget_exhausted,
            self.overflows,
            self.mirrored,
            self.faults,
            self.config_updates,
            self.mtls_handshakes,
            self.mtls_failures,
            self.inbound_connections,
        ]
        # Called at scrape time: families whose values are read from live state.
        self.gauges: list[Callable[[], Iterable[Family]]] = []

    def request(
        self, labels: tuple[str, ...], duration_ms: float, bytes_in: int, bytes_out: int
    ) -> None:
        requests = self.requests
        series = requests.get(labels)
        if series is None:
            if len(requests) >= MAX_SERIES:
                # Callers name their own source: past the bound, new names count as one.
                labels = (labels[0], *(("other",) * (len(labels) - 1)))
                series = requests.get(labels)
            if series is None:
                series = requests[labels] = _Request()
        series.count += 1
        series.duration.observe(duration_ms)
        series.request_bytes.observe(bytes_in)
        series.response_bytes.observe(bytes_out)

    def tcp(self, labels: tuple[str, ...]) -> _Tcp:
        series = self.tcp_series.get(labels)
        if series is None:
            series = self.tcp_series[labels] = _Tcp()
        return series

    def render(self) -> bytes:
        out: list[str] = []
        names = REQUEST_LABELS
        requests = list(self.requests.items())
        out.append(
            "# HELP istio_requests_total Requests, by source and destination.\n"
            "# TYPE istio_requests_total counter\n"
        )
        for values, series in requests:
            out.append(f"istio_requests_total{_labels(names, values)} {series.count}.0\n")
        for name, help, attribute in (
            ("istio_request_duration_milliseconds", "Request duration.", "duration"),
            ("istio_request_bytes", "Request body sizes.", "request_bytes"),
            ("istio_response_bytes", "Response body sizes.", "response_bytes"),
        ):
            out.append(f"# HELP {name} {help}\n# TYPE {name} histogram\n")
            for values, series in requests:
                _render_histogram(out, name, names, values, getattr(series, attribute))
        tcp = list(self.tcp_series.items())
        for attribute, name, help in (
            ("opened", "istio_tcp_connections_opened_total", "TCP connections opened."),
            ("closed", "istio_tcp_connections_closed_total", "TCP connections closed."),
            ("sent", "istio_tcp_sent_bytes_total", "Bytes sent to the client."),
            ("received", "istio_tcp_received_bytes_total", "Bytes received from the client."),
        ):
            out.append(f"# HELP {name} {help}\n# TYPE {name} counter\n")
            for values, connection in tcp:
                value = getattr(connection, attribute)
                out.append(f"{name}{_labels(_TCP_LABELS, values)} {value}.0\n")
        for family in self.counters:
            family.render(out)
        for read in self.gauges:
            for family in read():
                family.render(out)
        return "".join(out).encode()
