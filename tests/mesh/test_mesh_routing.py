"""Sidecars from a file: the app's three ways out (HTTP proxy, local port), routing, splits."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from harness import free_port
from mesh_support import metric, running, served_by, start_app, start_sidecar, static_service


def test_http_proxy_and_local_port_reach_a_service_by_name(tmp_path: Path) -> None:
    a = start_app(tmp_path, "payments", "v1")
    b = start_app(tmp_path, "payments", "v1")
    orders = start_app(tmp_path, "orders", "v1")
    local = free_port()
    config = {
        "services": [static_service("payments", [a, b])],
        "sidecar": {"upstreams": [{"service": "payments", "local_port": local}]},
    }
    sidecar = start_sidecar(tmp_path, "orders", orders.port, config=config)
    with running(a, b, orders, sidecar):
        with sidecar.client() as client:
            answers = [client.get("http://payments/charge?x=1") for _ in range(20)]
        assert {r.status_code for r in answers} == {200}
        doc = answers[0].json()
        assert doc["path"] == "/charge" and doc["query"] == "x=1"
        # The callee sees the service it was called by, and who called.
        assert doc["host"] == "payments"
        assert doc["source"] == "orders/unknown"
        # Round robin by default: both instances, evenly.
        assert served_by(answers) == {a.instance: 10, b.instance: 10}
        with httpx.Client(base_url=f"http://127.0.0.1:{local}", timeout=10) as client:
            direct = [client.get("/refund") for _ in range(4)]
        assert served_by(direct) == {a.instance: 2, b.instance: 2}
        # An unknown service is named in a clear 404.
        with sidecar.client() as client:
            missing = client.get("http://nowhere/x")
        assert missing.status_code == 404
        assert "nowhere" in missing.json()["detail"]
        metrics = sidecar.metrics()
        labels = {"reporter": "source", "source_workload": "orders"}
        ok = metric(
            metrics,
            "istio_requests_total",
            destination_service="payments",
            response_code="200",
            **labels,
        )
        assert ok == 24
        assert (
            metric(metrics, "istio_requests_total", response_code="404", response_flags="NR") == 1
        )
        assert (
            metric(
                metrics, "istio_request_duration_milliseconds_count", destination_service="payments"
            )
            == 24
        )


def test_weighted_split_90_10_within_two_percent(tmp_path: Path) -> None:
    v1 = start_app(tmp_path, "reviews", "v1")
    v2 = start_app(tmp_path, "reviews", "v2")
    caller = start_app(tmp_path, "web", "v1")
    service = static_service(
        "reviews",
        [v1, v2],
        subsets=[
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
        routes=[
            {
                "match": [{"headers": {"x-canary": {"exact": "yes"}}}],
                "destinations": [{"subset": "v2"}],
            },
            {"destinations": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]},
        ],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(v1, v2, caller, sidecar):
        with sidecar.client() as client:
            answers = [client.get("http://reviews/r") for _ in range(10_000)]
            canary = [
                client.get("http://reviews/r", headers={"x-canary": "yes"}) for _ in range(50)
            ]
        counts = served_by(answers)
        assert sum(counts.values()) == 10_000
        share = counts[v2.instance] / 10_000
        assert 0.08 <= share <= 0.12, counts
        assert served_by(canary) == {v2.instance: 50}


@pytest.mark.parametrize(
    "match, hit, miss",
    [
        ({"path": {"prefix": "/api"}}, "/api/x", "/apix"),
        ({"path": {"exact": "/only"}}, "/only", "/only/more"),
        ({"path": {"regex": "/items/[0-9]+"}}, "/items/42", "/items/x"),
        ({"method": "DELETE"}, None, None),
        ({"query": {"beta": {"present": True}}}, "/q?beta=1", "/q?alpha=1"),
    ],
)
def test_route_matches(tmp_path: Path, match: dict, hit: str | None, miss: str | None) -> None:
    v1 = start_app(tmp_path, "catalog", "v1")
    v2 = start_app(tmp_path, "catalog", "v2")
    caller = start_app(tmp_path, "web", "v1")
    service = static_service(
        "catalog",
        [v1, v2],
        subsets=[
            {"name": "one", "labels": {"version": "v1"}},
            {"name": "two", "labels": {"version": "v2"}},
        ],
        routes=[
            {"match": [match], "destinations": [{"subset": "two"}]},
            {"destinations": [{"subset": "one"}]},
        ],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(v1, v2, caller, sidecar), sidecar.client() as client:
        if hit is None:
            assert client.delete("http://catalog/x").headers["x-served-by"] == v2.instance
            assert client.get("http://catalog/x").headers["x-served-by"] == v1.instance
        else:
            assert client.get(f"http://catalog{hit}").headers["x-served-by"] == v2.instance
            assert client.get(f"http://catalog{miss}").headers["x-served-by"] == v1.instance


def test_header_changes_both_ways(tmp_path: Path) -> None:
    app = start_app(tmp_path, "catalog")
    caller = start_app(tmp_path, "web")
    service = static_service(
        "catalog",
        [app],
        routes=[
            {
                "headers": {
                    "request": {
                        "set": {"x-env": "canary"},
                        "add": {"x-tag": "mesh"},
                        "remove": ["x-debug"],
                    },
                    "response": {"set": {"x-served-through": "mesh"}, "remove": ["x-served-by"]},
                }
            }
        ],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(app, caller, sidecar), sidecar.client() as client:
        r = client.get(
            "http://catalog/x", headers={"x-env": "prod", "x-debug": "1", "x-tag": "app"}
        )
        seen = r.json()["headers"]
        assert seen["x-env"] == "canary"
        assert "x-debug" not in seen
        # The demo app keeps the last of repeated fields: the added one came after.
        assert seen["x-tag"] == "mesh"
        assert r.headers["x-served-through"] == "mesh"
        assert "x-served-by" not in r.headers
