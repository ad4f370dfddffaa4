"""What operators see: /metrics, /healthz, /readyz, /usage, /config and the access log."""

from __future__ import annotations

from pathlib import Path

import httpx
from gateway_e2e_support import (
    TIMEOUT,
    access_log,
    drop_keys,
    has_sample,
    sample_sum,
    scrape,
    serving_workers,
    unique_prefix,
    usage,
    wait_for,
)
from harness import (
    Proc,
    echo_upstream,
    example_product,
    free_port,
    gateway_config,
    run_gateway,
    shared_redis_url,
    wait_port,
)

KEY = {"X-API-Key": "k1"}


def test_metrics_count_requests_latencies_rejections_and_upstream_errors(tmp_path: Path) -> None:
    echo_port = free_port()
    echo = Proc(["echo", f"127.0.0.1:{echo_port}"], tmp_path, "echo")
    try:
        wait_port(echo_port, proc=echo.popen)
        plans = [{"name": "basic", "limits": [
            {"metric": "hits", "period": "eternity", "value": 100},
            {"metric": "search", "period": "eternity", "value": 0},
        ]}]  # fmt: skip
        config = gateway_config([example_product(echo_port, plans=plans)])
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            codes = [client.get("/echo/hello", headers=KEY).status_code for _ in range(5)]
            assert codes == [200] * 5
            assert client.get("/echo/search", headers=KEY).status_code == 429
            assert client.get("/echo/hello").status_code == 401
            assert client.get("/nowhere").status_code == 404
            echo.stop()
            failed = client.get("/echo/hello", headers=KEY)
            assert failed.status_code == 502
            assert failed.headers["content-type"] == "application/problem+json"

            text = scrape(gw)

            def requests(application: str, status_class: str, product: str = "echo") -> float:
                return sample_sum(
                    text,
                    "meshgate_requests_total",
                    product=product,
                    application=application,
                    status_class=status_class,
                )

            assert requests("app1", "2xx") == 5
            assert requests("app1", "4xx") == 1
            assert requests("", "4xx") == 1
            assert requests("", "4xx", product="") == 1
            assert requests("app1", "5xx") == 1
            limited = {"product": "echo", "application": "app1", "metric": "search"}
            assert sample_sum(text, "meshgate_limit_rejections_total", **limited) == 1
            assert sample_sum(text, "meshgate_upstream_errors_total", product="echo") == 1
            assert has_sample(text, "meshgate_upstream_errors_total", status="502")
            # Every answer of the product is timed; only the 5 that reached the upstream
            # have an upstream time (the failed connect has none).
            count = "meshgate_request_duration_seconds_count"
            assert sample_sum(text, count, product="echo") == 8
            assert sample_sum(text, "meshgate_upstream_duration_seconds_count", product="echo") == 5
            assert (
                sample_sum(
                    text, "meshgate_request_duration_seconds_bucket", product="echo", le="+Inf"
                )
                == 8
            )
            assert sample_sum(text, "meshgate_request_duration_seconds_sum", product="echo") > 0
            assert sample_sum(text, "meshgate_config_products") == 1
    finally:
        echo.stop()


def test_health_usage_and_config_endpoints(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.admin_url, timeout=TIMEOUT) as admin,
        ):
            assert admin.get("/healthz").json() == {"status": "ok"}
            ready = admin.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            assert ready.json()["config_version"] == admin.get("/config").json()["version"]
            assert admin.get("/config").json()["products"] == ["echo"]

            httpx.get(f"{gw.url}/echo/search", headers=KEY, timeout=TIMEOUT)
            doc = admin.get("/usage/app1").json()
            assert doc["application"] == "app1"
            assert [(p["product"], p["plan"]) for p in doc["products"]] == [("echo", "basic")]
            report = usage(gw, "app1")
            assert set(report) == {("hits", "minute"), ("search", "day")}
            fields = {"metric", "period", "value", "limit", "remaining", "reset_seconds"}
            for (metric, period), entry in report.items():
                assert set(entry) == fields
                assert (entry["metric"], entry["period"]) == (metric, period)
                assert entry["remaining"] == entry["limit"] - entry["value"]
                assert isinstance(entry["reset_seconds"], int) and entry["reset_seconds"] > 0
            assert report[("search", "day")]["value"] == 1

            unknown = admin.get("/usage/nobody")
            assert unknown.status_code == 404
            assert unknown.headers["content-type"] == "application/problem+json"
            assert admin.get("/nothing").status_code == 404
            assert admin.post("/healthz").status_code == 405


def test_access_log_one_json_line_per_request(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            sent = [
                client.get("/echo/hello", headers=KEY),
                client.get("/echo/hello"),
                client.get("/nowhere"),
                client.get("/echo/hello", headers={**KEY, "X-Request-Id": "trace-me-123"}),
            ]
            lines = access_log(gw, 4)
            assert len(lines) == 4
            for response, entry in zip(sent, lines, strict=True):
                assert entry["status"] == response.status_code
                assert entry["request_id"] == response.headers["x-request-id"]
                assert entry["method"] == "GET"
                assert isinstance(entry["duration_ms"], float)
            assert [e["product"] for e in lines] == ["echo", "echo", None, "echo"]
            assert [e["application"] for e in lines] == ["app1", None, None, "app1"]
            assert lines[0]["path"] == "/echo/hello" and lines[0]["upstream_ms"] is not None
            assert lines[3]["request_id"] == "trace-me-123"
            assert all(line.startswith("{") for line in gw.proc.stdout().splitlines())


def test_access_log_off(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)], access_log=False)
        with run_gateway(config, tmp_path) as gw:
            for _ in range(3):
                assert httpx.get(f"{gw.url}/echo/hello", headers=KEY).status_code == 200
            # The metrics prove the requests were logged as done; stdout stays empty.
            wait_for(
                lambda: sample_sum(scrape(gw), "meshgate_requests_total") == 3, what="3 requests"
            )
        assert gw.proc.stdout() == ""


def test_two_workers_aggregate_metrics(tmp_path: Path) -> None:
    url, prefix = shared_redis_url(), unique_prefix()
    try:
        with echo_upstream(tmp_path) as upstream:
            product = example_product(
                upstream,
                plans=[
                    {
                        "name": "basic",
                        "limits": [{"metric": "hits", "period": "eternity", "value": 1000}],
                    }
                ],
            )
            limits = {"backend": "redis", "redis_url": url, "key_prefix": prefix}
            config = gateway_config([product], limits=limits)
            with run_gateway(config, tmp_path, "--workers", "2") as gw:
                wait_for(lambda: serving_workers(gw) == 2, what="2 workers serving")
                total = 40
                for _ in range(total):
                    # A new connection each time: SO_REUSEPORT spreads them over both.
                    answer = httpx.get(f"{gw.url}/echo/hello", headers=KEY, timeout=TIMEOUT)
                    assert answer.status_code == 200
                # Each scrape is answered by either process; every one sees the whole.
                for _ in range(6):
                    text = scrape(gw)
                    ok = sample_sum(
                        text, "meshgate_requests_total", application="app1", status_class="2xx"
                    )
                    assert ok == total
                    assert sample_sum(text, "meshgate_request_duration_seconds_count") == total
                    assert sample_sum(text, "meshgate_config_products") == 1
                lines = access_log(gw, total)
                assert len(lines) == total
                assert len(set(line["request_id"] for line in lines)) == total
    finally:
        drop_keys(url, prefix)
