"""TLS to backends: verified against a CA bundle, with SNI and an optional client certificate;
a certificate that does not verify is a 502 that says why, and nothing is sent in clear."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import TIMEOUT
from harness import example_product, gateway_config, run_gateway
from tls_support import CertificateAuthority, https_upstream

ETERNAL = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 10**9}]}]


def product_for(port: int, **overrides: Any) -> dict[str, Any]:
    return example_product(0, plans=ETERNAL, backend=f"https://127.0.0.1:{port}/base", **overrides)


def get(gw: Any, path: str = "/echo/hi") -> httpx.Response:
    return httpx.get(gw.url + path, headers={"X-API-Key": "k1"}, timeout=TIMEOUT)


def test_https_backends_are_verified_and_reused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cert = ca.issue("backend", dns=("backend.internal",), ips=("127.0.0.1",))
    with https_upstream(cert) as upstream:
        port = upstream.server_address[1]
        tls = {"ca_file": str(ca.cert_path)}
        config = gateway_config([product_for(port, upstream_tls=tls)])
        with run_gateway(config, tmp_path) as gw:
            for _ in range(3):
                r = get(gw)
                assert r.status_code == 200, r.text
            seen = r.json()
            assert seen["path"] == "/base/hi"
            assert seen["headers"]["host"] == f"127.0.0.1:{port}"
        # SNI and the name checked can differ from the address dialled.
        tls = {"ca_file": str(ca.cert_path), "server_name": "backend.internal"}
        config = gateway_config([product_for(port, upstream_tls=tls)])
        with run_gateway(config, tmp_path, name="sni") as gw:
            assert get(gw).status_code == 200
        assert upstream.requests == 4


def test_a_backend_certificate_that_does_not_verify_is_a_502_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    cases = {
        "wrong host": ca.issue("wrong", dns=("elsewhere.internal",)),
        "expired": ca.issue("expired", ips=("127.0.0.1",), expired=True),
        "self-signed": ca.issue("self", ips=("127.0.0.1",), self_signed=True),
    }
    for case, cert in cases.items():
        with https_upstream(cert) as upstream:
            port = upstream.server_address[1]
            config = gateway_config(
                [product_for(port, upstream_tls={"ca_file": str(ca.cert_path)})]
            )
            with run_gateway(config, tmp_path, name=case.replace(" ", "-")) as gw:
                r = get(gw)
                assert r.status_code == 502, (case, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert "does not verify" in r.json()["detail"], (case, r.text)
            assert upstream.requests == 0, case
    # Without a CA bundle the system's trust store is used: a private CA is not in it.
    with https_upstream(ca.issue("private", ips=("127.0.0.1",))) as upstream:
        config = gateway_config([product_for(upstream.server_address[1])])
        with run_gateway(config, tmp_path, name="system") as gw:
            r = get(gw)
            assert r.status_code == 502
            assert "does not verify" in r.json()["detail"]
        assert upstream.requests == 0
    # verify: false is an explicit choice (tests only).
    with https_upstream(cases["self-signed"]) as upstream:
        config = gateway_config(
            [product_for(upstream.server_address[1], upstream_tls={"verify": False})]
        )
        with run_gateway(config, tmp_path, name="noverify") as gw:
            assert get(gw).status_code == 200


def test_upstream_mutual_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    clients = CertificateAuthority(tmp_path / "clients", name="client CA")
    gateway_cert = clients.issue("gateway", cn="gateway.meshgate", client=True)
    with https_upstream(ca.issue("backend", ips=("127.0.0.1",)), client_ca=clients) as upstream:
        port = upstream.server_address[1]
        tls = {
            "ca_file": str(ca.cert_path),
            "client_cert": str(gateway_cert.cert),
            "client_key": str(gateway_cert.key),
        }
        config = gateway_config([product_for(port, upstream_tls=tls)])
        with run_gateway(config, tmp_path) as gw:
            r = get(gw)
            assert r.status_code == 200, r.text
            assert r.json()["client_cn"] == "gateway.meshgate"
        # Without the client certificate the backend refuses the handshake: 502.
        config = gateway_config([product_for(port, upstream_tls={"ca_file": str(ca.cert_path)})])
        with run_gateway(config, tmp_path, name="nocert") as gw:
            r = get(gw)
            assert r.status_code == 502, r.text
        assert upstream.requests == 1


def test_a_missing_ca_file_refuses_the_configuration(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with https_upstream(ca.issue("backend", ips=("127.0.0.1",))) as upstream:
        port = upstream.server_address[1]
        good = gateway_config([product_for(port, upstream_tls={"ca_file": str(ca.cert_path)})])
        with run_gateway(good, tmp_path) as gw:
            assert get(gw).status_code == 200
            bad = dict(good)
            bad["products"] = [
                product_for(port, upstream_tls={"ca_file": str(tmp_path / "missing.pem")})
            ]
            gw.write_config(bad)
            time.sleep(2.0)
            # Refused at reload: the running configuration stays.
            status = httpx.get(gw.admin_url + "/config", timeout=TIMEOUT).json()
            assert "missing.pem" in (status.get("last_error") or ""), status
            assert get(gw).status_code == 200
