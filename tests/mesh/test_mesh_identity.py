"""Workload identities from the control plane's CA: a sidecar with a bootstrap token gets its
certificate before it is ready, renews it at half life while it serves, follows a root
rotation; one without a valid token gets none; an edge gateway gets its own identity."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from harness import Proc, free_port, wait_port
from mesh_support import attached_sidecar, running, start_app, start_control_plane


class Load(threading.Thread):
    """Requests through the sidecar's inbound listener without pause; failures kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopping.is_set():
                try:
                    r = client.get(self.url)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


def _identity(admin_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{admin_url}/config", timeout=5).json()["identity"])


def _until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def test_a_sidecar_gets_renews_and_rotates_its_identity_while_serving(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path, "--cert-ttl", "20")
    token = cp.api.post("/mesh/bootstrap-tokens", json={"service": "orders"}).json()["token"]
    gateway_token = cp.api.post(
        "/mesh/bootstrap-tokens", json={"service": "meshgate-gateway", "single_use": True}
    ).json()["token"]
    app = start_app(tmp_path, "orders")
    refused = attached_sidecar(
        tmp_path, cp, "orders", app.port, "--bootstrap-token", "mgb_forged", wait_ready=False
    )
    sidecar = attached_sidecar(
        tmp_path, cp, "orders", app.port, "--bootstrap-token", token, "--bundle-refresh", "0.5"
    )
    gateway = None
    load = Load(f"http://127.0.0.1:{sidecar.inbound}/orders")
    with running(cp, app, refused, sidecar):
        try:
            config = httpx.get(f"{sidecar.admin_url}/config", timeout=5).text
            assert "PRIVATE KEY" not in config
            first = _identity(sidecar.admin_url)
            assert first["spiffe_id"] == "spiffe://meshgate.local/ns/production/sa/orders"
            assert first["serial"] and first["bundle_roots"] == 1 and first["last_error"] is None

            # No valid token: no certificate, and so never ready, saying why.
            denied = _until(
                "the forged token refused",
                lambda: (i := _identity(refused.admin_url))["last_error"] and i,
                10,
            )
            assert denied["spiffe_id"] is None and "not valid" in denied["last_error"]
            readyz = httpx.get(f"{refused.admin_url}/readyz", timeout=5)
            assert readyz.status_code == 503
            assert "workload certificate" in readyz.json()["reason"]

            # Renewed at half of its 20 s life while requests flow.
            load.start()
            renewed = _until(
                "a renewal",
                lambda: (i := _identity(sidecar.admin_url))["serial"] != first["serial"] and i,
                15,
            )
            assert renewed["renewals"] == 1 and renewed["spiffe_id"] == first["spiffe_id"]

            # A rotation reaches the sidecar within its bundle interval.
            assert cp.api.post("/ca/rotate").status_code == 201
            _until(
                "both roots in the bundle",
                lambda: _identity(sidecar.admin_url)["bundle_roots"] == 2,
                5,
            )
            assert cp.api.post("/ca/retire").status_code == 200
            # Its root retired, the sidecar's certificate is replaced at once by one of the
            # new root (the bootstrap token allows more than one use).
            active = next(r for r in cp.api.get("/ca").json()["roots"] if r["state"] == "active")
            moved = _until(
                "a certificate of the new root",
                lambda: (
                    (i := _identity(sidecar.admin_url))["issuer"] == active["subject"]
                    and i["bundle_roots"] == 1
                    and i
                ),
                8,
            )
            assert moved["serial"] not in (first["serial"], renewed["serial"])
            time.sleep(0.5)
            load.stop()
            assert load.failures == [] and load.ok > 50, (load.ok, load.failures[:5])
            assert sidecar.ready()

            # The edge gateway's own identity.
            gateway = _gateway(tmp_path, cp.url, cp.token, gateway_token)
            identity = _until(
                "the gateway's identity",
                lambda: (i := _identity(gateway[1]))["spiffe_id"] and i,
                10,
            )
            assert identity["spiffe_id"].endswith("/ns/production/sa/meshgate-gateway")
        finally:
            load.stop()
            if gateway is not None:
                gateway[0].stop()


def _gateway(workdir: Path, url: str, admin_token: str, token: str) -> tuple[Proc, str]:
    port, admin = free_port(), free_port()
    settings = workdir / "gateway.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "limits": {"backend": "memory"},
            }
        )
    )
    proc = Proc(
        [
            "gateway", "--control-plane", url, "--token", admin_token, "--config", str(settings),
            "--cache-dir", str(workdir / "gateway-cache"), "--bootstrap-token", token,
        ],
        workdir,
        "gateway",
    )  # fmt: skip
    wait_port(admin, proc=proc.popen, timeout=30)
    return proc, f"http://127.0.0.1:{admin}"


def test_a_root_rotation_between_strict_sidecars_fails_no_request(tmp_path: Path) -> None:
    """The operator's procedure: rotate (both roots trusted), let every workload renew onto
    the new root, retire the old one; calls over mutual TLS go on throughout."""
    cp = start_control_plane(tmp_path, "--cert-ttl", "16")
    cp.put_service({"name": "orders", "mtls": {"mode": "strict"}})
    tokens = {
        service: cp.api.post("/mesh/bootstrap-tokens", json={"service": service}).json()["token"]
        for service in ("orders", "shop")
    }
    orders_app, shop_app = start_app(tmp_path, "orders"), start_app(tmp_path, "shop")
    fast = ["--bundle-refresh", "0.5"]
    orders = attached_sidecar(
        tmp_path, cp, "orders", orders_app.port, "--bootstrap-token", tokens["orders"], *fast
    )
    shop = attached_sidecar(
        tmp_path, cp, "shop", shop_app.port, "--bootstrap-token", tokens["shop"], *fast
    )
    sidecars = (orders, shop)
    load = ProxyLoad(shop.proxy, "http://orders/pay")
    with running(cp, orders_app, shop_app, orders, shop):
        try:
            with httpx.Client(proxy=shop.proxy, timeout=10) as client:
                _until("shop reaches orders", lambda: client.get("http://orders/x").is_success, 15)
            plain = httpx.get(f"http://127.0.0.1:{orders.inbound}/x", timeout=5)
            assert plain.status_code == 403, "orders takes only mutual TLS"
            load.start()
            old = next(r for r in cp.api.get("/ca").json()["roots"] if r["state"] == "active")
            assert cp.api.post("/ca/rotate").status_code == 201
            new = next(r for r in cp.api.get("/ca").json()["roots"] if r["state"] == "active")
            assert new["subject"] != old["subject"]
            for sidecar in sidecars:
                _until(
                    "both roots trusted, then a certificate of the new root",
                    lambda s=sidecar: (
                        (i := _identity(s.admin_url))["bundle_roots"] == 2
                        and i["issuer"] == new["subject"]
                    ),
                    15,
                )
            assert cp.api.post("/ca/retire").status_code == 200
            for sidecar in sidecars:
                _until(
                    "the old root gone from the bundle",
                    lambda s=sidecar: _identity(s.admin_url)["bundle_roots"] == 1,
                    5,
                )
            time.sleep(1.0)
            load.stop()
            assert load.failures == [] and load.ok > 50, (load.ok, load.failures[:5])
            metrics = httpx.get(f"{orders.admin_url}/metrics", timeout=5).text
            assert 'connection_security_policy="mutual_tls"' in metrics
        finally:
            load.stop()


class ProxyLoad(Load):
    """Requests through a sidecar's outbound proxy, by the service's name."""

    def __init__(self, proxy: str, url: str) -> None:
        super().__init__(url)
        self.proxy = proxy

    def run(self) -> None:
        with httpx.Client(proxy=self.proxy, timeout=10) as client:
            while not self.stopping.is_set():
                try:
                    r = client.get(self.url)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
