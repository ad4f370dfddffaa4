"""The control plane's own metrics, parsed as Prometheus parses them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from control_support import attached_gateway, make_product, start_control
from harness import within
from prometheus_client.parser import text_string_to_metric_families


def _samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    ]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def test_metrics_count_requests_snapshots_long_polls_and_gateways(tmp_path: Path) -> None:
    cp = start_control(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        with attached_gateway(tmp_path, cp.url, cp.token) as gw:
            product = make_product(cp)
            cp.post(f"/products/{product['id']}/promote")
            served = cp.wait_snapshot("production", lambda d: bool(d["products"]), timeout=10)
            version = float(cp.snapshot("production").headers["X-Meshgate-Version"])
            within(10, lambda: gw.get("/echo/x").status_code != 404, "the gateway applied it")
            assert httpx.get(f"{cp.url}/admin/api/products").status_code == 401
            httpx.request("PROPFIND", f"{cp.url}/admin/api/products")
            httpx.get(f"{cp.url}/no/such/page")

            def applied() -> bool:
                samples = _samples(cp.url)
                return (
                    _value(samples, "meshgate_control_dataplane_applied_version", dataplane="gw1")
                    == version
                )

            within(15, applied, "the gateway's applied version in the metrics")
            samples = _samples(cp.url)
            assert served["products"]
    finally:
        cp.stop()
    total = "meshgate_control_requests_total"
    assert _value(samples, total, route="/admin/api/products", method="POST", status="201") == 1
    # Refused before routing (no token): counted, under no route.
    assert _value(samples, total, route="(unmatched)", method="GET", status="401") == 1
    # Ids stay out of the labels: the route's template names the series.
    promote = "/admin/api/products/{item_id}/promote"
    assert _value(samples, total, route=promote, method="POST") == 1
    assert _value(samples, total, method="other") >= 1
    assert _value(samples, total, route="(unmatched)", status="404") >= 1
    assert not [
        lab for n, lab, _ in samples if n == total and re.search(r"/\d+(/|$)", lab["route"])
    ]
    assert _value(samples, "meshgate_control_request_duration_seconds_count") > 0
    # The gateway's long poll waits now.
    assert _value(samples, "meshgate_control_long_polls", kind="gateway") >= 1
    assert _value(samples, "meshgate_control_snapshot_compile_seconds_count", env="production") >= 1
    assert _value(samples, "meshgate_control_snapshot_version", env="production") == version
    assert _value(samples, "meshgate_control_snapshot_bytes", env="production") > 100
    assert _value(samples, "meshgate_control_dataplanes", env="production", connected="true") == 1
    assert ("meshgate_control_mesh_registry", {"kind": "instances"}, 0.0) in samples
