"""The engine's TLS and upgrade settings go wherever a product setting goes: the admin API, the
staged snapshot, apply and export, and a gateway attached to the control plane; so do the
client certificates that identify applications (auth mtls)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
from control_support import (
    PROPAGATION_S,
    ControlPlane,
    attached_gateway,
    make_product,
    problem,
    within,
)
from harness import echo_upstream, free_port
from tls_support import CertificateAuthority, client_ssl, https_upstream


def _staged(cp: ControlPlane, name: str, has: str | None = None) -> dict[str, Any]:
    def found(doc: dict[str, Any]) -> bool:
        products = {p["name"]: p for p in doc["products"]}
        return name in products and (has is None or has in products[name])

    doc = cp.wait_snapshot("staging", found)
    return dict(next(p for p in doc["products"] if p["name"] == name))


def test_tls_and_upgrade_settings_are_stored_shown_patched_and_staged(
    control: ControlPlane,
) -> None:
    cp = control
    name = f"tls-{uuid.uuid4().hex[:6]}"
    product = make_product(cp, name=name, path_prefix=f"/{name}")
    assert product["websocket"] is True and product["max_upstream_connections"] == 1024
    assert product["upstream_tls"] is None and product["certificate"] is None
    staged = _staged(cp, name)
    for setting in ("websocket", "max_upstream_connections", "upstream_tls", "certificate"):
        assert setting not in staged

    tls = {"ca_file": "/etc/meshgate/backends.pem", "server_name": "backend.internal"}
    changed = cp.api.patch(
        f"/products/{product['id']}",
        json={
            "upstream_tls": tls,
            "certificate": "shop",
            "websocket": False,
            "max_upstream_connections": 50,
        },
    )
    assert changed.status_code == 200, changed.text
    staged = _staged(cp, name, has="upstream_tls")
    assert staged["upstream_tls"] == {**tls, "verify": True}  # stored whole
    assert staged["certificate"] == "shop"
    assert staged["websocket"] is False and staged["max_upstream_connections"] == 50

    pid = product["id"]
    problem(
        cp.api.patch(f"/products/{pid}", json={"upstream_tls": {"client_cert": "/c.pem"}}),
        422,
    )
    problem(cp.api.patch(f"/products/{pid}", json={"max_upstream_connections": 0}), 422)
    problem(cp.api.patch(f"/products/{pid}", json={"certificate": "bad name"}), 422)
    injected = {"server_name": "a\r\nX-Injected: 1"}
    problem(cp.api.patch(f"/products/{pid}", json={"upstream_tls": injected}), 422)


def test_application_certificates_through_the_api_and_the_snapshot(control: ControlPlane) -> None:
    cp = control
    name = f"mtls-{uuid.uuid4().hex[:6]}"
    product = make_product(cp, name=name, path_prefix=f"/{name}", auth={"type": "mtls"})
    account = cp.post("/accounts", {"name": f"acme-{uuid.uuid4().hex[:6]}"})
    plan = cp.post(f"/products/{product['id']}/plans", {"name": "basic", "state": "published"})
    certs = [{"sha256": "ab" * 32}, {"subject": "CN=web, O=Acme"}]
    app = cp.post(
        "/applications",
        {"account_id": account["id"], "plan_id": plan["id"], "name": "web", "certificates": certs},
    )
    assert app["certificates"] == certs
    staged = _staged(cp, name)
    (doc,) = [a for a in staged["applications"] if a["id"] == app["app_id"]]
    assert doc["certificates"] == certs

    moved = [{"san": "spiffe://acme/ns/prod/sa/web"}]
    answer = cp.api.patch(f"/applications/{app['id']}", json={"certificates": moved})
    assert answer.status_code == 200, answer.text
    assert answer.json()["certificates"] == moved
    problem(
        cp.api.patch(f"/applications/{app['id']}", json={"certificates": [{"sha256": "zz"}]}),
        422,
    )
    problem(
        cp.api.patch(
            f"/applications/{app['id']}",
            json={"certificates": [{"san": "a", "subject": "CN=b"}]},
        ),
        422,
    )


def test_apply_and_export_carry_the_settings(control: ControlPlane) -> None:
    cp = control
    name = f"decl-{uuid.uuid4().hex[:6]}"
    doc = {
        "products": [
            {
                "name": name,
                "path_prefix": f"/{name}",
                "backend": "https://backend.internal:8443",
                "auth": {"type": "mtls"},
                "upstream_tls": {"ca_file": "/etc/ca.pem", "verify": True},
                "certificate": "shop",
                "websocket": False,
                "max_upstream_connections": 10,
                "plans": [{"name": "basic"}],
                "applications": [
                    {"id": f"{name}-a", "plan": "basic", "certificates": [{"sha256": "cd" * 32}]}
                ],
            }
        ]
    }
    applied = cp.api.post("/declarative", params={"prune": "false"}, json=doc)
    assert applied.status_code == 200, applied.text
    exported = cp.api.get("/declarative", params={"product": name})
    assert exported.status_code == 200, exported.text
    (product,) = [p for p in exported.json()["products"] if p["name"] == name]
    assert product["upstream_tls"] == {"ca_file": "/etc/ca.pem", "verify": True}
    assert product["certificate"] == "shop"
    assert product["websocket"] is False and product["max_upstream_connections"] == 10
    (app,) = product["applications"]
    assert app["certificates"] == [{"sha256": "cd" * 32}]
    # Applying the export changes nothing.
    again = cp.api.post(
        "/declarative", params={"prune": "false", "dry_run": "true"}, json={"products": [product]}
    )
    assert again.status_code == 200, again.text
    assert again.json()["changes"] == [], again.json()


def test_an_attached_gateway_serves_mtls_and_https_backends_from_the_control_plane(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    cp = control_sqlite
    pki = CertificateAuthority(tmp_path / "pki")
    clients = CertificateAuthority(tmp_path / "clients", name="client CA")
    web = clients.issue("web", cn="web", client=True)
    listener_cert = pki.issue("gw", dns=("api.example.test",))
    backend_cert = pki.issue("backend", ips=("127.0.0.1",))
    with https_upstream(backend_cert) as backend, echo_upstream(tmp_path):
        product = make_product(
            cp,
            name="secure",
            path_prefix="/secure",
            backend=f"https://127.0.0.1:{backend.server_address[1]}",
            upstream_tls={"ca_file": str(pki.cert_path)},
            auth={"type": "mtls"},
        )
        account = cp.post("/accounts", {"name": f"acme-{uuid.uuid4().hex[:6]}"})
        plan = cp.post(f"/products/{product['id']}/plans", {"name": "p", "state": "published"})
        cp.post(
            "/applications",
            {
                "account_id": account["id"],
                "plan_id": plan["id"],
                "name": "web",
                "certificates": [{"sha256": web.sha256}],
            },
        )
        cp.post(f"/products/{product['id']}/promote")
        tls_port = free_port()
        tls = {
            "listen": f"127.0.0.1:{tls_port}",
            "certificates": [{"cert": str(listener_cert.cert), "key": str(listener_cert.key)}],
            "client_ca": str(clients.cert_path),
            "client_auth": "optional",
        }
        with attached_gateway(tmp_path, cp.url, cp.token, settings_extra={"tls": tls}):
            url = f"https://127.0.0.1:{tls_port}/secure/hello"
            sni = {"sni_hostname": "api.example.test"}

            def status(cert: Any) -> int:
                with httpx.Client(verify=client_ssl(pki, cert), timeout=5) as client:
                    return client.get(url, extensions=sni).status_code

            within(PROPAGATION_S * 5, lambda: status(web) == 200, "the application admitted")
            assert status(None) == 401
            assert backend.requests >= 1
