"""``meshgate up``: the control plane on SQLite, the echo upstream and an attached gateway,
as the README's first command starts them."""

from __future__ import annotations

import io
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import httpx
import pypdf
import yaml
from harness import Proc, free_port, within
from otlp_receiver import OtlpReceiver


def example_path() -> Path:
    return Path(str(resources.files("meshgate").joinpath("examples/gateway.yaml")))


def _wait_for(text: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.stdout():
        assert proc.popen.poll() is None, proc.stderr()[-3000:]
        assert time.monotonic() < deadline, proc.stdout() + proc.stderr()[-3000:]
        time.sleep(0.1)


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_up_starts_the_platform_seeded_with_the_example(tmp_path: Path) -> None:
    example = yaml.safe_load(example_path().read_text())
    upstream, control_port = free_port(), free_port()
    example["listen"] = f"127.0.0.1:{free_port()}"
    example["admin_listen"] = f"127.0.0.1:{free_port()}"
    example["products"][0]["backend"] = f"http://127.0.0.1:{upstream}"
    config = tmp_path / "example.yaml"
    config.write_text(yaml.safe_dump(example))
    data = tmp_path / "data"
    tls_port, integration_admin, integration_port = free_port(), free_port(), free_port()
    routes_url = f"http://127.0.0.1:{integration_port}"
    args = [
        "up",
        "--config",
        str(config),
        "--upstream",
        f"127.0.0.1:{upstream}",
        "--control-listen",
        f"127.0.0.1:{control_port}",
        "--data-dir",
        str(data),
        "--integration-listen",
        f"127.0.0.1:{integration_port}",
        "--integration-admin-listen",
        f"127.0.0.1:{integration_admin}",
        "--tls-listen",
        f"127.0.0.1:{tls_port}",
    ]
    proc = Proc(args, tmp_path, "up")
    try:
        _wait_for("stop with Ctrl-C", proc)
        token = (data / "admin-token").read_text().strip()
        assert token in proc.stdout()
        # Every address it serves is printed, the routes' admin listener included.
        assert f"integration admin http://127.0.0.1:{integration_admin}" in proc.stdout()
        routes = httpx.get(f"http://127.0.0.1:{integration_admin}/metrics")
        assert routes.status_code == 200
        # `meshgate status` says what runs, where, and which version the gateway applied.
        status = subprocess.run(
            [sys.executable, "-m", "meshgate", "status", "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"control plane     http://127.0.0.1:{control_port}/admin/api/  answering" in (
            status.stdout
        )
        assert "demo-gateway (production) applied version" in status.stdout
        assert ", connected" in status.stdout and "NOT" not in status.stdout
        gateway = f"http://{example['listen']}"
        assert httpx.get(f"{gateway}/echo/hello", headers={"X-API-Key": "k1"}).status_code == 200
        # HTTPS with the certificate made for localhost, trusted through the demo CA.
        ca = data / "tls" / "ca.pem"
        assert f"https://localhost:{tls_port}" in proc.stdout()
        assert (data / "tls" / "localhost.key").stat().st_mode & 0o777 == 0o600
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
            r = client.get(f"https://localhost:{tls_port}/echo/hello", headers={"X-API-Key": "k1"})
        assert r.status_code == 200
        assert r.json()["headers"]["x-forwarded-proto"] == "https"
        # HTTP/2: by ALPN over TLS, and with prior knowledge in cleartext.
        context = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(verify=context, http2=True) as client:
            r = client.get(f"https://localhost:{tls_port}/echo/hello", headers={"X-API-Key": "k1"})
        assert (r.status_code, r.http_version) == (200, "HTTP/2")
        with httpx.Client(http1=False, http2=True) as client:
            r = client.get(f"{gateway}/echo/hello", headers={"X-API-Key": "k1"})
        assert (r.status_code, r.http_version) == (200, "HTTP/2")

        # The mesh demo: orders calls payments through its sidecar, 90 % v1 and 10 % v2,
        # and beta testers (x-beta: 1) reach v2 only.
        with httpx.Client(proxy="http://127.0.0.1:15001", timeout=10) as client:
            versions = Counter(
                client.get("http://payments/charge").json()["version"] for _ in range(400)
            )
            beta = {
                client.get("http://payments/charge", headers={"x-beta": "1"}).json()["version"]
                for _ in range(10)
            }
        assert set(versions) == {"v1", "v2"} and 0.04 <= versions["v2"] / 400 <= 0.18, versions
        assert beta == {"v2"}
        # payments is strict: orders' sidecar calls it over mutual TLS, plaintext is refused.
        plain = httpx.get("http://127.0.0.1:15026/charge", timeout=5)
        assert plain.status_code == 403 and "mutual TLS required" in plain.json()["detail"]
        metrics = httpx.get("http://127.0.0.1:15000/metrics", timeout=5).text
        assert 'destination_service="payments"' in metrics
        assert 'connection_security_policy="mutual_tls"' in metrics
        # Every sidecar, and the gateway, holds a workload identity from the control plane's CA.
        identity = httpx.get("http://127.0.0.1:15000/config").json()["identity"]
        assert identity["spiffe_id"] == "spiffe://meshgate.local/ns/production/sa/orders"
        admin = f"http://{example['admin_listen']}"
        gateway_id = httpx.get(f"{admin}/config").json()["identity"]["spiffe_id"]
        assert gateway_id == "spiffe://meshgate.local/ns/production/sa/meshgate-gateway"
        # Only orders may call payments (the policy orders-only): payments' own sidecar may not.
        with httpx.Client(proxy="http://127.0.0.1:15021", timeout=10) as client:
            denied = client.get("http://payments/charge")
        assert denied.status_code == 403, denied.text
        assert denied.json()["allow_policies"] == ["orders-only"], denied.text
        # The shop product's backend is the mesh: the gateway calls orders over mutual TLS with
        # its own identity; orders calls payments; both see the consumer the gateway vouched for.
        shop = httpx.get(f"{gateway}/shop/call/payments/charge", headers={"X-API-Key": "k2"})
        assert shop.status_code == 200, shop.text
        body = shop.json()
        assert body["service"] == "orders" and body["consumer"]["plan"] == "gold"
        assert body["source"].startswith("meshgate-gateway")
        called = body["answer"]
        assert called["service"] == "payments" and called["source"].startswith("orders")
        assert called["consumer"]["application"]["id"] == "shop-app"
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{control_port}/admin/api",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert {i["service"] for i in api.get("/mesh/instances").json()["items"]} == {
            "orders",
            "payments",
        }
        products = {p["name"]: p for p in api.get("/products").json()["items"]}
        assert set(products) == {"echo", "shop"}
        product = products["echo"]
        [plan] = api.get(f"/products/{product['id']}/plans").json()["items"]
        account = api.post("/accounts", json={"name": "walkthrough"}).json()
        # The limit is 5 a minute and an alert needs its usage reported within that minute
        # (the gateway reports every 5 s): start with most of a minute ahead.
        left = 60 - time.time() % 60
        if left < 35:
            time.sleep(left + 0.5)
        app = api.post(
            "/applications",
            json={"account_id": account["id"], "plan_id": plan["id"], "name": "mine"},
        ).json()
        deadline = time.monotonic() + 2
        while True:
            status = httpx.get(
                f"{gateway}/echo/hello", headers={"X-API-Key": app["key"]}
            ).status_code
            if status == 200:
                break
            assert time.monotonic() < deadline, f"new application still {status} after 2 s"
            time.sleep(0.05)

        # The business side of the walkthrough: the traffic above reaches analytics, a limit
        # crossed makes an alert, a billing run makes an invoice whose PDF holds its total.
        refused = [
            httpx.get(f"{gateway}/echo/hello", headers={"X-API-Key": app["key"]}).status_code
            for _ in range(6)
        ]
        assert 429 in refused, refused

        def used() -> int:
            series = api.get(
                "/analytics/usage",
                params={"application": app["app_id"], "granularity": "minute"},
            ).json()
            return int(series["total"])

        deadline = time.monotonic() + 20
        while (
            used() < 5
            or not api.get("/alerts", params={"application": app["app_id"]}).json()["total"]
        ):
            assert time.monotonic() < deadline, (used(), api.get("/alerts").json())
            time.sleep(0.5)
        [alert] = api.get("/alerts", params={"application": app["app_id"]}).json()["items"]
        assert (alert["level"], alert["violation"]) == (100, True)
        month = time.strftime("%Y-%m", time.gmtime())
        run = api.post("/billing/runs", json={"period": month, "account_id": account["id"]})
        assert run.status_code == 201, run.text
        [invoice] = api.get("/invoices", params={"account_id": account["id"]}).json()["items"]
        assert invoice["total"] not in ("0", "0.00")
        pdf = api.get(f"/invoices/{invoice['id']}.pdf")
        text = pypdf.PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
        assert f"Total: {invoice['total']} EUR" in text, text
        api.close()
    finally:
        # Ctrl-C: the terminal signals `up` alone (its children have process groups of
        # their own); it stops them in order, a line each, in well under two seconds.
        asked = time.monotonic()
        proc.signal(signal.SIGINT)
        try:
            proc.popen.wait(10)
        finally:
            took = time.monotonic() - asked
            assert proc.stop() in (0, 130)
    out = proc.stdout()
    for line in ("stopped gateway", "stopped mesh demo", "stopped control plane"):
        assert line in out, out[-2000:]
    assert took < 2.0, f"Ctrl-C took {took:.1f} s"
    for log in (proc.stderr(), (data / "control.log").read_text()):
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert _closed(control_port), "the control plane outlived meshgate up"
    after = subprocess.run(
        [sys.executable, "-m", "meshgate", "status", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert after.returncode == 1 and f"nothing runs under {data}" in after.stdout
    assert _closed(15001) and _closed(9101), "the mesh demo outlived meshgate up"

    # A second start keeps the data and the token, and seeds nothing again; this one traces
    # every layer to a collector.
    receiver = OtlpReceiver().__enter__()
    traced = [*args, "--tracing-endpoint", receiver.endpoint]
    proc = Proc(traced, tmp_path, "up-again")
    try:
        _wait_for("stop with Ctrl-C", proc)
        assert httpx.get(f"{gateway}/echo/t", headers={"X-API-Key": "k1"}).status_code == 200
        with httpx.Client(proxy="http://127.0.0.1:15001", timeout=10) as client:
            assert client.get("http://payments/charge").status_code == 200
        order = {"id": "o-9", "total": 5}
        assert httpx.post(f"{routes_url}/orders", json=order).status_code == 200

        def services() -> set[str]:
            return {span.service for span in receiver.spans}

        wanted = {"meshgate-gateway", "orders", "payments", "meshgate-integration"}
        within(20, lambda: wanted <= services(), "spans of every layer")
        # One request from the edge through two services is one trace.
        shop = httpx.get(f"{gateway}/shop/call/payments/charge", headers={"X-API-Key": "k2"})
        assert shop.status_code == 200, shop.text

        def one_trace() -> bool:
            by_trace: dict[str, set[str]] = {}
            for span in receiver.spans:
                by_trace.setdefault(span.trace_id, set()).add(span.service)
            return any({"meshgate-gateway", "orders", "payments"} <= s for s in by_trace.values())

        within(20, one_trace, "one trace from the gateway through orders to payments")
        # A third, from another directory on the same ports, says why it cannot start and
        # leaves nothing behind.
        other = tmp_path / "other"
        other.mkdir()
        elsewhere = [str(other / "data") if a == str(data) else a for a in args]
        third = Proc(elsewhere, other, "up-3")
        assert third.popen.wait(30) == 1
        assert f"port {control_port} is in use: another meshgate up?" in third.stderr()
        assert not (other / "data").exists()
        third.stop()
        assert (data / "admin-token").read_text().strip() == token
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{control_port}/admin/api",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert api.get("/products").json()["total"] == 2
        assert api.get("/applications").json()["total"] == 3
        assert api.get("/mesh/services").json()["total"] == 1
        api.close()
    finally:
        proc.signal(signal.SIGINT)
        proc.stop()
        receiver.__exit__()
