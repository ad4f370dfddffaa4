"""The per-request series kept as plain numbers expose exactly what prometheus_client would."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from meshgate.telemetry.metrics import GatewayMetrics

OBSERVATIONS = [
    ("echo", "app1", 200, 0.0003, 0.0001),
    ("echo", "app1", 200, 0.0005, 0.0005),  # on a bucket bound: counted in that bucket
    ("echo", "app2", 429, 0.002, None),
    ("other", "", 404, 0.7, None),
    ("echo", "app1", 502, 31.0, 30.5),  # beyond the last bound: +Inf only
    ("echo", "app1", 0, 0.01, None),  # no status: the "other" class
    ("echo", "app1", 600, 0.02, None),  # another "other": the same series
]


def _exposition(metrics: GatewayMetrics) -> bytes:
    for observation in OBSERVATIONS:
        metrics.observe(*observation)
    metrics.limit_rejections.labels("echo", "app2", "hits", "minute").inc()
    return generate_latest(metrics.registry)


def test_exposition_matches_prometheus_client_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    fast = _exposition(GatewayMetrics())
    # With the variable set the metrics are prometheus_client's (the values class was
    # chosen at import, so these stay in memory here).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    reference = _exposition(GatewayMetrics())
    assert fast == reference
    text = fast.decode()
    assert (
        'meshgate_requests_total{application="app1",product="echo",status_class="2xx"} 2.0' in text
    )
    assert (
        'meshgate_requests_total{application="app1",product="echo",status_class="other"} 2.0'
        in text
    )
    assert 'meshgate_request_duration_seconds_bucket{le="0.0005",product="echo"} 2.0' in text
    assert 'meshgate_upstream_duration_seconds_count{product="other"} 0.0' in text


def test_a_fresh_registry_lists_the_families_without_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    fast = generate_latest(GatewayMetrics().registry)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    assert fast == generate_latest(GatewayMetrics().registry)
    assert b"# TYPE meshgate_requests_total counter" in fast
