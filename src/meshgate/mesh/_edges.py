"""The sidecar's part of the service graph: edges read from its request metrics.

Nothing is added to the request path: every ``interval`` the link reads the cumulative
request series of :class:`MeshMetrics`, takes what changed since the last report, and sends
it as edges (``POST /dp/v1/mesh/edges``). A call between two sidecars is reported once, by
the caller (``reporter="source"``); the callee reports only callers without a sidecar of
their own (an edge gateway, a client outside the mesh), which no other sidecar reports.
"""

from __future__ import annotations

from typing import Any

from meshgate.config.edges import DURATION_BOUNDS_MS, UNKNOWN
from meshgate.config.identity import GATEWAY_SERVICE
from meshgate.mesh._metrics import REQUEST_LABELS, MeshMetrics

__all__ = ["EdgeCollector"]

_SOURCE = REQUEST_LABELS.index("source_workload")
_DESTINATION = REQUEST_LABELS.index("destination_service_name")
_CODE = REQUEST_LABELS.index("response_code")
_SECURITY = (
    REQUEST_LABELS.index("connection_security_policy")
    if "connection_security_policy" in REQUEST_LABELS
    else None
)
# Callers a callee reports: those whose own sidecar does not.
_UNREPORTED = frozenset((UNKNOWN, GATEWAY_SERVICE))


class EdgeCollector:
    """Turns the metrics' running totals into per-interval edges."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics
        # Per request series: (count, duration bucket counts) as last reported.
        self._sent: dict[tuple[str, ...], tuple[int, list[int]]] = {}
        # Taken but not yet acknowledged: sent again with the next report when it failed.
        self._pending: dict[tuple[str, str], list[Any]] = {}

    def collect(self) -> list[dict[str, Any]]:
        """The edges since the last call, added to any the control plane has not taken yet."""
        pending = self._pending
        sent = self._sent
        buckets = len(DURATION_BOUNDS_MS)
        for labels, series in list(self.metrics.requests.items()):
            reporter = labels[0]
            source = labels[_SOURCE].partition("/")[0]
            if source == "other" or (reporter == "destination" and source not in _UNREPORTED):
                continue
            count = series.count
            counts = series.duration.counts
            last = sent.get(labels)
            if last is not None and last[0] == count:
                continue
            before = last[1] if last is not None else [0] * buckets
            delta = count - (last[0] if last is not None else 0)
            sent[labels] = (count, list(counts))
            key = (source, labels[_DESTINATION])
            edge = pending.get(key)
            if edge is None:
                edge = pending[key] = [0, 0, 0, [0] * buckets]
            edge[0] += delta
            code = labels[_CODE]
            if code.startswith("5") or code == "0":
                edge[1] += delta
            if _SECURITY is not None and labels[_SECURITY] == "mutual_tls":
                edge[2] += delta
            durations = edge[3]
            for i in range(buckets):
                durations[i] += counts[i] - before[i]
        return [
            {
                "source": source,
                "destination": destination,
                "requests": requests,
                "errors": errors,
                "mtls": mtls,
                "durations": durations,
            }
            for (source, destination), (requests, errors, mtls, durations) in pending.items()
            if requests
        ]

    def acknowledged(self) -> None:
        """The control plane took the last report."""
        self._pending = {}
