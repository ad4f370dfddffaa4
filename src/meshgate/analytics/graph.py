"""The service graph: edges reported by sidecars, added up over a window.

Each report (``POST /dp/v1/mesh/edges``) is stored as it came, one row per edge, with the
second it arrived; the graph over the last N seconds is a sum over those rows, so reports
from any number of sidecars and control-plane replicas add up with no read-modify-write.
Rows are kept a day (:data:`KEEP_SECONDS`; the retention job deletes older ones).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, delete, insert, select
from sqlalchemy.orm import Mapped, mapped_column

from meshgate.config.edges import DURATION_BOUNDS_MS, UNKNOWN, EdgeReport
from meshgate.config.identity import GATEWAY_SERVICE
from meshgate.control._db import Database
from meshgate.control.models import Base

__all__ = ["KEEP_SECONDS", "MeshEdge", "graph", "percentile", "purge", "store"]

KEEP_SECONDS = 86400


class MeshEdge(Base):
    """The calls one workload made to one service between two reports of one sidecar."""

    __tablename__ = "mesh_edges"
    __table_args__ = (Index("ix_mesh_edges_env_at", "env", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    env: Mapped[str] = mapped_column(String(32))
    at: Mapped[int] = mapped_column(BigInteger)
    reporter: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(253))
    destination: Mapped[str] = mapped_column(String(253))
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    mtls: Mapped[int] = mapped_column(BigInteger)
    durations: Mapped[list[int]] = mapped_column(JSON)


def store(db: Database, report: EdgeReport, reporter: str, now: float | None = None) -> int:
    """Keep a report's edges; how many."""
    at = int(time.time() if now is None else now)
    rows = [
        {
            "env": report.env,
            "at": at,
            "reporter": reporter,
            "source": edge.source,
            "destination": edge.destination,
            "requests": edge.requests,
            "errors": edge.errors,
            "mtls": edge.mtls,
            "durations": list(edge.durations),
        }
        for edge in report.edges
        if edge.requests
    ]
    if rows:
        with db.writer() as session, session.begin():
            session.execute(insert(MeshEdge), rows)
    return len(rows)


def purge(db: Database, now: float | None = None) -> int:
    cutoff = int((time.time() if now is None else now) - KEEP_SECONDS)
    with db.writer() as session, session.begin():
        result = session.execute(delete(MeshEdge).where(MeshEdge.at < cutoff))
        return int(result.rowcount)  # type: ignore[attr-defined]


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram on DURATION_BOUNDS_MS, interpolated within its
    bucket as Prometheus's histogram_quantile does; None without observations."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for bound, count in zip(DURATION_BOUNDS_MS, buckets, strict=True):
        if count and seen + count >= rank:
            if math.isinf(bound):
                return lower  # slower than the last finite bound: say that bound
            return round(lower + (bound - lower) * (rank - seen) / count, 3)
        seen += count
        if not math.isinf(bound):
            lower = bound
    return lower


def _kind(name: str) -> str:
    if name == GATEWAY_SERVICE:
        return "gateway"
    if name == UNKNOWN:
        return "external"
    return "service"


def graph(
    db: Database,
    env: str,
    window: int,
    instances: Sequence[dict[str, Any]] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """Nodes and edges of ``env`` over the last ``window`` seconds. ``instances`` (the live
    registry) adds services that were not called, with their ready instance counts."""
    now = time.time() if now is None else now
    since = int(now - window)
    n = len(DURATION_BOUNDS_MS)
    edges: dict[tuple[str, str], list[Any]] = {}
    with db.session() as session:
        rows = session.execute(
            select(
                MeshEdge.source,
                MeshEdge.destination,
                MeshEdge.requests,
                MeshEdge.errors,
                MeshEdge.mtls,
                MeshEdge.durations,
            ).where(MeshEdge.env == env, MeshEdge.at >= since)
        )
        for source, destination, requests, errors, mtls, durations in rows:
            edge = edges.get((source, destination))
            if edge is None:
                edge = edges[(source, destination)] = [0, 0, 0, [0] * n]
            edge[0] += requests
            edge[1] += errors
            edge[2] += mtls
            if isinstance(durations, list) and len(durations) == n:
                sums = edge[3]
                for i, count in enumerate(durations):
                    sums[i] += int(count)
    nodes: dict[str, dict[str, Any]] = {}

    def node(name: str) -> dict[str, Any]:
        found = nodes.get(name)
        if found is None:
            found = nodes[name] = {
                "name": name,
                "kind": _kind(name),
                "instances": 0,
                "ready_instances": 0,
                "requests_in": 0,
                "errors_in": 0,
                "requests_out": 0,
            }
        return found

    for instance in instances:
        entry = node(str(instance["service"]))
        entry["instances"] += 1
        entry["ready_instances"] += 1 if instance.get("ready") else 0
    out_edges = []
    for (source, destination), (requests, errors, mtls, durations) in sorted(edges.items()):
        node(source)["requests_out"] += requests
        target = node(destination)
        target["requests_in"] += requests
        target["errors_in"] += errors
        out_edges.append(
            {
                "source": source,
                "destination": destination,
                "requests": requests,
                "errors": errors,
                "error_rate": round(errors / requests, 6) if requests else 0.0,
                "requests_per_second": round(requests / window, 3),
                "mtls_requests": mtls,
                "mtls": "all" if mtls == requests else "none" if mtls == 0 else "some",
                "latency_ms": {
                    "p50": percentile(durations, 0.5),
                    "p90": percentile(durations, 0.9),
                    "p99": percentile(durations, 0.99),
                },
            }
        )
    for entry in nodes.values():
        entry["error_rate"] = (
            round(entry["errors_in"] / entry["requests_in"], 6) if entry["requests_in"] else 0.0
        )
    return {
        "env": env,
        "window_seconds": window,
        "until": int(now),
        "nodes": sorted(nodes.values(), key=lambda e: e["name"]),
        "edges": out_edges,
    }
