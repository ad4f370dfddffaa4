"""Hostile input at a sidecar: names a client makes up do not grow its metrics, label
values that would break the exposition are escaped, and bad files are refused whole."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from mesh_support import metric, running, start_app, start_sidecar, static_service
from prometheus_client.parser import text_string_to_metric_families

from meshgate.config.mesh import ConfigError, parse_mesh
from meshgate.mesh._metrics import MAX_SERIES, MeshMetrics


def test_request_series_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_SERIES == 10_000
    monkeypatch.setattr("meshgate.mesh._metrics.MAX_SERIES", 100)
    metrics = MeshMetrics()
    for i in range(150):
        labels = ("destination", f"caller-{i}", "v1", "s", "s", "s", "v1", "http", "200", "-")
        labels += ("none", "unknown", "unknown")
        metrics.request(labels, 1.0, 0, 0)
    assert len(metrics.requests) == 101
    text = metrics.render().decode()
    total = sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "istio_requests_total"
    )
    assert total == 150


def test_made_up_names_and_hostile_label_values(tmp_path: Path) -> None:
    app = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    sidecar = start_sidecar(
        tmp_path, "orders", caller.port, config={"services": [static_service("payments", [app])]}
    )
    callee = start_sidecar(tmp_path, "payments", app.port, config={"services": []})
    with running(app, caller, sidecar, callee):
        with sidecar.client() as client:
            for i in range(50):
                assert client.get(f"http://made-up-{i}/x").status_code == 404
        metrics = sidecar.metrics()
        assert metric(metrics, "istio_requests_total", response_flags="NR") == 50
        assert "made-up" not in metrics
        # A caller that names itself with quotes, backslashes and newlines: kept out.
        hostile = 'evil"} 1\\n# x/v"1'
        with httpx.Client(timeout=10) as client:
            r = client.get(
                f"http://127.0.0.1:{callee.inbound}/x", headers={"x-meshgate-source": hostile}
            )
        assert r.status_code == 200
        text = callee.metrics()
        workloads = {
            s.labels.get("source_workload")
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "istio_requests_total"
        }
        assert "unknown" in workloads and not any("evil" in w for w in workloads if w)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("services: [", "line 1, column 12"),
        ("services: {a: 1}", "services: must be a list"),
        (
            "services:\n  - name: a\n    instances: [{address: 'x y', port: 0}]\n",
            "services[0].instances[0]",
        ),
        ("services: []\nextra: 1\n", "extra"),
        ("a: &a [*a]\n", ""),
        ("services: [" + "{name: a}, " * 5 + "{name: a}]", "given twice"),
    ],
)
def test_bad_mesh_files_are_refused_with_their_paths(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mesh(text, "mesh.yaml")
    assert expected in str(caught.value)
    assert "mesh.yaml" in str(caught.value)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("services: []\n" + "#" * (9 * 2**20))
    from meshgate.config.mesh import load_mesh

    with pytest.raises(ConfigError, match="big.yaml"):
        load_mesh(path)


def test_a_connection_that_broke_after_sending_is_not_retried_by_default() -> None:
    from meshgate.mesh._routes import DEFAULT_RETRIES
    from meshgate.mesh._traffic import _ERROR_RETRIED_BY, _classify

    on = set(DEFAULT_RETRIES.retry_on)
    # Nothing was sent: retried.
    assert _classify(502, "cannot connect to 127.0.0.1:9: Connection refused") == "connect-failure"
    assert _ERROR_RETRIED_BY["connect-failure"] & on
    # Sent, then the connection broke: the instance may have acted on it.
    for error in ("upstream closed the connection", "[Errno 104] Connection reset by peer"):
        assert _classify(502, error) == "reset"
    assert not _ERROR_RETRIED_BY["reset"] & on
