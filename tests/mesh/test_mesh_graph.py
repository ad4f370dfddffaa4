"""The service graph: sidecars report the calls they see, the control plane adds them up,
and the graph's counts are the requests sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import within
from mesh_support import attached_sidecar, running, start_app, start_control_plane

from meshgate.analytics.graph import percentile
from meshgate.config.edges import DURATION_BOUNDS_MS


def _edge(graph: dict[str, Any], source: str, destination: str) -> dict[str, Any] | None:
    for edge in graph["edges"]:
        if edge["source"] == source and edge["destination"] == destination:
            return edge
    return None


def test_the_graph_counts_what_was_sent(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    orders = start_app(tmp_path, "orders")
    payments = start_app(tmp_path, "payments")
    fast = ["--edge-interval", "0.3"]
    orders_sc = attached_sidecar(tmp_path, cp, "orders", orders.port, *fast)
    payments_sc = attached_sidecar(tmp_path, cp, "payments", payments.port, *fast)
    with running(orders, payments, orders_sc, payments_sc, cp):
        within(10, lambda: len(cp.instances("payments")) == 1, "payments registered")
        # As the orders app would: through its sidecar, by the service's name.
        with orders_sc.client() as client:
            within(10, lambda: client.get("http://payments/").status_code == 200, "routed")
            sent = 1
            for i in range(60):
                path = "/status/503" if i % 10 == 0 else f"/pay/{i}"
                client.get(f"http://payments{path}")
                sent += 1
        # A caller outside the mesh, straight to payments' inbound listener.
        with httpx.Client(base_url=f"http://127.0.0.1:{payments_sc.inbound}") as outside:
            for _ in range(7):
                assert outside.get("/x").status_code == 200

        def graph() -> dict[str, Any]:
            r = cp.api.get("/mesh/graph", params={"env": "production", "window": 600})
            assert r.status_code == 200, r.text
            return dict(r.json())

        def settled() -> bool:
            g = graph()
            a, b = _edge(g, "orders", "payments"), _edge(g, "unknown", "payments")
            return bool(a and b and a["requests"] == sent and b["requests"] == 7)

        within(10, settled, "the graph has every call")
        g = graph()
        edge = _edge(g, "orders", "payments")
        assert edge is not None
        assert edge["errors"] == 6 and edge["error_rate"] == pytest.approx(6 / sent, abs=1e-6)
        assert edge["mtls"] == "none" and edge["mtls_requests"] == 0
        assert 0 < edge["latency_ms"]["p50"] <= edge["latency_ms"]["p99"] < 1000
        # Calls between two sidecars count once: payments' own report of them is not added.
        assert [e for e in g["edges"] if e["destination"] == "payments"] == [
            e for e in g["edges"] if e["source"] in ("orders", "unknown")
        ]
        nodes = {n["name"]: n for n in g["nodes"]}
        assert nodes["payments"]["requests_in"] == sent + 7
        assert nodes["payments"]["ready_instances"] == 1 and nodes["orders"]["kind"] == "service"
        assert nodes["unknown"]["kind"] == "external"
        # A sidecar that stops sends what it saw last.
        with orders_sc.client() as client:
            for _ in range(5):
                client.get("http://payments/late")
        orders_sc.proc.stop()
        within(5, lambda: _edge(graph(), "orders", "payments")["requests"] == sent + 5, "flushed")  # type: ignore[index]
        # Reads need a token; reports need a data-plane token.
        assert httpx.get(f"{cp.url}/admin/api/mesh/graph").status_code == 401


def _report(edges: list[dict[str, Any]], env: str = "production") -> bytes:
    return json.dumps({"env": env, "edges": edges}).encode()


def _row(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source": "a",
        "destination": "b",
        "requests": 2,
        "errors": 0,
        "mtls": 0,
        "durations": [1, 1] + [0] * (len(DURATION_BOUNDS_MS) - 2),
    }
    row.update(over)
    return row


def test_bad_reports_are_refused_whole_and_name_the_field(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    with running(cp):
        post = lambda body, **h: httpx.post(  # noqa: E731
            f"{cp.url}/dp/v1/mesh/edges",
            content=body,
            headers={
                "Authorization": f"Bearer {cp.token}",
                "Content-Type": "application/json",
                **h,
            },
            timeout=10,
        )
        assert post(b"{").status_code == 400
        cases = {
            _report([_row(requests=3)]): "durations",
            _report([_row(errors=5)]): "errors",
            _report([_row(durations=[2])]): "durations",
            _report([_row(source="A B")]): "source",
            _report([_row(requests=-1)]): "requests",
            _report([_row()], env="qa"): "env",
            _report([_row(extra=1)]): "extra",
        }
        for body, field in cases.items():
            r = post(body)
            assert r.status_code == 422, (body, r.text)
            assert field in json.dumps(r.json()["errors"]) or field == "body", r.text
        big = _report([_row(source=f"s{i}") for i in range(30_000)])
        assert post(big).status_code in (413, 422)
        assert post(_report([_row()]), Authorization="Bearer nope").status_code == 401
        graph = cp.api.get("/mesh/graph").json()
        assert graph["edges"] == []
        # The report that is whole counts.
        assert post(_report([_row()])).status_code == 202
        assert _edge(cp.api.get("/mesh/graph").json(), "a", "b")["requests"] == 2  # type: ignore[index]
        assert cp.api.get("/mesh/graph", params={"window": 1}).status_code == 422


def test_percentiles_interpolate_within_a_bucket() -> None:
    n = len(DURATION_BOUNDS_MS)
    assert percentile([0] * n, 0.5) is None
    one = [0] * n
    one[2] = 10  # ten calls between 1 and 5 ms
    assert percentile(one, 0.5) == pytest.approx(3.0)
    slow = [0] * n
    slow[-1] = 4  # slower than the last finite bound: that bound
    assert percentile(slow, 0.99) == DURATION_BOUNDS_MS[-2]
