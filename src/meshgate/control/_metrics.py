"""The control plane's own Prometheus metrics, served at ``/metrics``.

- ``meshgate_control_requests_total{route,method,status}`` and
  ``meshgate_control_request_duration_seconds{route,method}``: every API request, by its
  route's template (``/admin/api/products/{product_id}``, never the raw path: ids would grow
  the series without bound); long polls and endpoint streams count when they end;
- ``meshgate_control_long_polls`` (open now, by kind) and
  ``meshgate_control_snapshot_compile_seconds{env}``, ``meshgate_control_snapshot_bytes{env}``,
  ``meshgate_control_snapshot_version{env}``;
- ``meshgate_control_dataplanes{env,connected}`` and
  ``meshgate_control_dataplane_applied_version{dataplane,env}`` (read from the store when
  scraped), and the mesh registry's instances and streams;
- ``meshgate_control_ca_certificates_issued_total`` and
  ``meshgate_control_ca_refusals_total{reason}``: the mesh CA's workload certificates, and
  the requests for one it refused (``bad_token``, ``used_token``, ``weak_key``, ...).

Each application has a registry of its own (several control planes can share a process, as
tests do); nothing is global.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshgate.control.models import Dataplane

if TYPE_CHECKING:
    from meshgate.control._plane import ControlPlane

__all__ = ["ControlMetrics", "RequestMetrics"]

# Seen within this long: connected (as GET /admin/api/dataplanes says).
CONNECTED_SECONDS = 60
# Dataplanes listed one by one, at most: a larger fleet is still counted.
MAX_LISTED = 2000
# Methods a label may name; any other a client sends is counted as "other".
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class ControlMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meshgate_control_requests",
            "API requests, by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "meshgate_control_request_duration_seconds",
            "API request duration, by route template and method.",
            ["route", "method"],
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
            registry=r,
        )
        self.long_polls = Gauge(
            "meshgate_control_long_polls",
            "Long polls waiting now, by what they wait for (gateway snapshot or mesh config).",
            ["kind"],
            registry=r,
        )
        self.compile_seconds = Histogram(
            "meshgate_control_snapshot_compile_seconds",
            "Time to compile and store an environment's snapshot.",
            ["env"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.snapshot_bytes = Gauge(
            "meshgate_control_snapshot_bytes",
            "Size of the newest snapshot, by environment.",
            ["env"],
            registry=r,
        )
        self.snapshot_version = Gauge(
            "meshgate_control_snapshot_version",
            "Version of the newest snapshot, by environment.",
            ["env"],
            registry=r,
        )
        self.plane: ControlPlane | None = None
        r.register(_Live(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Read at scrape time: the gateways from the store, the registry from memory."""

    def __init__(self, metrics: ControlMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        plane = self.metrics.plane
        if plane is None:
            return
        counts = GaugeMetricFamily(
            "meshgate_control_dataplanes",
            f"Gateways known, by environment and whether seen in the last {CONNECTED_SECONDS} s.",
            labels=["env", "connected"],
        )
        applied = GaugeMetricFamily(
            "meshgate_control_dataplane_applied_version",
            "The snapshot version each connected gateway applied.",
            labels=["dataplane", "env"],
        )
        since = datetime.now(UTC) - timedelta(seconds=CONNECTED_SECONDS)
        totals: dict[tuple[str, str], int] = {}
        with plane.db.session() as session:
            rows = session.execute(
                select(Dataplane.id, Dataplane.env, Dataplane.version, Dataplane.last_seen)
            )
            listed = 0
            for name, env, version, seen in rows:
                if seen.tzinfo is None:
                    seen = seen.replace(tzinfo=UTC)
                connected = seen >= since
                key = (env, "true" if connected else "false")
                totals[key] = totals.get(key, 0) + 1
                if connected and listed < MAX_LISTED and version and version.isdigit():
                    applied.add_metric([name, env], float(version))
                    listed += 1
        for (env, state), n in sorted(totals.items()):
            counts.add_metric([env, state], n)
        yield counts
        yield applied
        registry = GaugeMetricFamily(
            "meshgate_control_mesh_registry",
            "The mesh registry: registered instances and open endpoint streams.",
            labels=["kind"],
        )
        for kind, value in plane.registry.counts().items():
            if isinstance(value, int | float):
                registry.add_metric([kind], value)
        yield registry
        issued = CounterMetricFamily(
            "meshgate_control_ca_certificates_issued",
            "Workload certificates the mesh CA issued (first ones and renewals).",
        )
        issued.add_metric([], plane.ca.issued)
        yield issued
        refusals = CounterMetricFamily(
            "meshgate_control_ca_refusals",
            "Certificate requests the mesh CA refused, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(plane.ca.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals


class RequestMetrics:
    """ASGI middleware: each request counted by the template of the route that served it.

    The template is the one the OpenAPI document gives the route's operation (a route of an
    included router knows only its path within that router)."""

    def __init__(
        self, app: ASGIApp, metrics: ControlMetrics, schema: Callable[[], dict[str, Any]]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.schema = schema
        self._templates: dict[str, str] | None = None

    def _template(self, scope: Scope) -> str:
        route: Any = scope.get("route")
        if route is None:
            return "(unmatched)"
        templates = self._templates
        if templates is None:
            templates = self._templates = {
                operation["operationId"]: path
                for path, item in self.schema().get("paths", {}).items()
                for operation in item.values()
                if isinstance(operation, dict) and "operationId" in operation
            }
        found = templates.get(getattr(route, "unique_id", ""))
        return found or scope.get("root_path", "") + str(getattr(route, "path", "(unmatched)"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            template = self._template(scope)
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "other"
            self.metrics.requests.labels(template, method, str(status[0])).inc()
            self.metrics.duration.labels(template, method).observe(time.perf_counter() - started)
