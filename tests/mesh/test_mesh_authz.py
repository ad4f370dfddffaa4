"""Authorization policies on a sidecar's inbound side (Istio's semantics), and the consumer
token as the destination's sidecar checks it: real sidecars, apps, certificates, tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import Proc, free_port, wait_port, within
from mesh_support import (
    attached_sidecar,
    metric,
    running,
    start_app,
    start_control_plane,
    start_sidecar,
)
from pki_support import GATEWAY, TestCA

from meshgate.config.mesh import ConfigError, parse_mesh, validate_mesh
from meshgate.identity import peer_id
from meshgate.identity.consumer import ConsumerSigner
from meshgate.mesh._authz import Authorizer
from meshgate.mesh._metrics import MeshMetrics
from meshgate.proxy import Headers, Request

POLICIES: list[dict[str, Any]] = [
    {"name": "deny-admin", "action": "deny", "rules": [{"to": {"paths": ["/admin/*"]}}]},
    {
        "name": "public-read",
        "rules": [{"to": {"methods": ["GET", "HEAD"], "paths": ["/public/*", "*.json"]}}],
    },
    {
        "name": "gold-writes",
        "rules": [{"to": {"methods": ["POST"]}, "consumer": {"plans": ["gold"]}}],
    },
    {"name": "partner", "rules": [{"consumer": {"applications": ["partner-42"]}}]},
    {"name": "tenant", "rules": [{"when": [{"header": "x-tenant", "values": ["acme"]}]}]},
]


def _request(method: str, path: str, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(method, path.encode(), path, "", Headers(raw))


def _authorizer(policies: list[dict[str, Any]]) -> tuple[Authorizer, MeshMetrics]:
    config = validate_mesh({"services": [{"name": "orders", "authorization": policies}]})
    metrics = MeshMetrics()
    service = config.service("orders")
    assert service is not None
    return Authorizer("orders", service.authorization, metrics.authz), metrics


def test_principal_rules_with_a_real_certificates_spiffe_id() -> None:
    ca = TestCA()
    der = x509.load_pem_x509_certificate(ca.issue("frontend").chain_pem).public_bytes(
        serialization.Encoding.DER
    )
    caller = peer_id(der)
    assert caller is not None
    principal = caller.uri
    authz, metrics = _authorizer(
        [
            # Istio's form (no scheme) and the full URI both work; * ends a prefix.
            {
                "name": "frontend",
                "rules": [{"from": {"principals": ["meshgate.local/ns/production/sa/frontend"]}}],
            },
            {
                "name": "staging",
                "rules": [{"from": {"principals": ["spiffe://meshgate.local/ns/staging/*"]}}],
            },
            {
                "name": "no-plaintext",
                "action": "deny",
                "rules": [{"from": {"not_principals": ["*"]}}],
            },
        ]
    )
    assert authz.uses_principal
    get = _request("GET", "/x")
    assert authz.decide(get, principal, None).policy == "frontend"
    other = peer_id(
        x509.load_pem_x509_certificate(ca.issue("billing").chain_pem).public_bytes(
            serialization.Encoding.DER
        )
    )
    assert other is not None
    refused = authz.decide(get, other.uri, None)
    assert (refused.allowed, refused.policy) == (False, None)
    staging = authz.decide(get, "spiffe://meshgate.local/ns/staging/sa/billing", None)
    assert (staging.allowed, staging.policy) == (True, "staging")
    plaintext = authz.decide(get, None, None)
    assert (plaintext.allowed, plaintext.policy) == (False, "no-plaintext")
    text = metrics.render().decode()
    assert metric(text, "meshgate_mesh_authz_total", policy="frontend", result="allowed") == 1
    assert metric(text, "meshgate_mesh_authz_total", policy="no-plaintext", result="denied") == 1
    assert metric(text, "meshgate_mesh_authz_total", policy="(none)", result="denied") == 1


def test_values_and_headers_match_as_istio() -> None:
    authz, _ = _authorizer(
        [
            {
                "name": "deny-debug",
                "action": "deny",
                "rules": [{"when": [{"header": "x-debug", "values": ["*"]}]}],
            },
            {"name": "suffix", "rules": [{"to": {"paths": ["*.csv"], "not_methods": ["DELETE"]}}]},
            {"name": "exact", "rules": [{"to": {"paths": ["/exact"]}}]},
        ]
    )
    assert authz.decide(_request("GET", "/r/a.csv"), None, None).policy == "suffix"
    assert not authz.decide(_request("DELETE", "/r/a.csv"), None, None).allowed
    assert authz.decide(_request("GET", "/exact"), None, None).allowed
    assert not authz.decide(_request("GET", "/exact/more"), None, None).allowed
    denied = authz.decide(_request("GET", "/exact", {"x-debug": "1"}), None, None)
    assert (denied.allowed, denied.policy) == (False, "deny-debug")
    # Two fields of one name are matched joined, as Envoy does: no value hides behind another.
    tenant, _ = _authorizer(
        [{"name": "t", "rules": [{"when": [{"header": "X-Tenant", "values": ["acme"]}]}]}]
    )
    request = _request("GET", "/", {"x-tenant": "acme"})
    request.headers.add("x-tenant", "evil")
    assert not tenant.decide(request, None, None).allowed
    assert tenant.decide(_request("GET", "/", {"x-tenant": "acme"}), None, None).allowed


def test_hostile_policy_documents_are_refused_with_clear_errors() -> None:
    def errors(policies: Any, protocol: str = "http") -> str:
        doc = {"services": [{"name": "orders", "protocol": protocol, "authorization": policies}]}
        with pytest.raises(ConfigError) as caught:
            parse_mesh(json.dumps(doc))
        return str(caught.value)

    rule = lambda r: [{"name": "p", "rules": [r]}]  # noqa: E731
    assert "regular expressions are not supported" in errors(
        rule({"to": {"paths": ["/a/(.*)/b*"]}})
    )
    assert "'*' may only start or end a value" in errors(rule({"from": {"principals": ["a*b"]}}))
    assert "at most 256 items" in errors(rule({"to": {"paths": [f"/p{i}" for i in range(257)]}}))
    assert "at most 64 items" in errors([{"name": f"p{i}", "rules": []} for i in range(65)])
    assert "at most 1024 characters" in errors(rule({"to": {"paths": ["/" + "a" * 2000]}}))
    assert "give values, not_values or both" in errors(rule({"when": [{"header": "x-a"}]}))
    assert "must be a header name" in errors(rule({"when": [{"header": "x a", "values": ["1"]}]}))
    assert "a path starts with /" in errors(rule({"to": {"paths": ["admin"]}}))
    assert "names must be unique" in errors([{"name": "p"}, {"name": "p", "action": "deny"}])
    assert "to.regex: unknown field" in errors(rule({"to": {"regex": "/.*"}}))
    assert "action" in errors([{"name": "p", "action": "audit"}])
    assert "tcp service" in errors([{"name": "p"}], protocol="tcp")


def _service(policies: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"services": [{"name": "orders", **({"authorization": policies} if policies else {})}]}


def test_policies_and_consumer_tokens_at_a_real_sidecar(tmp_path: Path) -> None:
    ca = TestCA()
    files = ca.issue("orders").write(tmp_path, "orders")
    gateway = ca.issue(GATEWAY).identity()
    signer = ConsumerSigner(gateway)
    app = start_app(tmp_path, "orders")
    sidecar = start_sidecar(
        tmp_path, "orders", app.port, config=_service(), extra=[
            "--identity-cert", files["cert"], "--identity-key", files["key"],
            "--trust-bundle", files["bundle"],
        ],
    )  # fmt: skip
    bare = start_sidecar(tmp_path, "orders", app.port, config=_service(), name="no-identity")
    url = f"http://127.0.0.1:{sidecar.inbound}"
    with running(app, sidecar, bare), httpx.Client(base_url=url, timeout=10) as client:
        # No policy: everything is allowed, and counted.
        assert client.post("/anything").status_code == 200
        allowed_by_default = [1]

        def applied() -> bool:
            if client.post("/anything").status_code == 403:
                return True
            allowed_by_default[0] += 1  # asked before the new configuration was applied
            return False

        sidecar.write_config(_service(POLICIES))
        within(10, applied, "policies applied")

        def status(method: str, path: str, **headers: str) -> int:
            return client.request(method, path, headers=headers).status_code

        assert status("GET", "/public/a") == 200
        assert status("GET", "/reports/q3.json") == 200
        assert status("POST", "/public/a") == 403
        assert status("GET", "/other", **{"x-tenant": "acme"}) == 200
        assert status("GET", "/other", **{"x-tenant": "other"}) == 403
        r = client.get("/admin/users", headers={"x-tenant": "acme"})
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["policy"] == "deny-admin"
        assert "deny-admin" in r.json()["detail"]
        r = client.post("/orders")
        assert (r.status_code, r.json()["policy"]) == (403, None)
        assert "no allow policy" in r.json()["detail"]

        gold = signer.token("shop", "app-7", "App Seven", "acme", "gold").decode()
        silver = signer.token("shop", "app-8", "App Eight", "acme", "silver").decode()
        partner = signer.token("shop", "partner-42", "Partner", "globex", "silver").decode()
        r = client.post("/orders", headers={"x-meshgate-consumer": gold})
        assert r.status_code == 200, r.text
        assert r.json()["headers"]["x-meshgate-consumer"] == gold
        assert status("POST", "/orders", **{"x-meshgate-consumer": silver}) == 403
        assert status("GET", "/anything", **{"x-meshgate-consumer": partner}) == 200

        # Forged: signed by a workload that is not a gateway, or under another root.
        forged_by_service = ConsumerSigner(ca.issue("orders").identity())
        forged_by_outsider = ConsumerSigner(TestCA().issue(GATEWAY).identity())
        for forger in (forged_by_service, forged_by_outsider):
            token = forger.token("shop", "app-7", "App Seven", "acme", "gold").decode()
            r = client.get("/public/x", headers={"x-meshgate-consumer": token})
            assert r.status_code == 200
            assert "x-meshgate-consumer" not in r.json()["headers"]
            assert status("POST", "/orders", **{"x-meshgate-consumer": token}) == 403
        # Hostile: garbage, oversized, two tokens at once.
        for junk in ("x", "a.b.c", "e30.e30.", "A" * 9000):
            r = client.get("/public/x", headers={"x-meshgate-consumer": junk})
            assert r.status_code == 200
            assert "x-meshgate-consumer" not in r.json()["headers"]
        r = client.get(
            "/public/x", headers=[("x-meshgate-consumer", gold), ("x-meshgate-consumer", gold)]
        )
        assert "x-meshgate-consumer" not in r.json()["headers"]

        # Expired: signed by the gateway, past its life (beyond the 5 s of clock skew allowed).
        past = ConsumerSigner(gateway, ttl=10, clock=lambda: time.time() - 60)
        expired = past.token("shop", "app-7", "App Seven", "acme", "gold").decode()
        r = client.get("/public/x", headers={"x-meshgate-consumer": expired})
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert "expired" in r.json()["detail"]

        text = sidecar.metrics()

        def count(**labels: str) -> float:
            return metric(text, "meshgate_mesh_authz_total", **labels)

        def tokens(result: str) -> float:
            return metric(text, "meshgate_mesh_consumer_tokens_total", result=result)

        def requests(**labels: str) -> float:
            return metric(text, "istio_requests_total", reporter="destination", **labels)

        assert count(policy="(none)", action="default", result="allowed") == allowed_by_default[0]
        assert count(policy="deny-admin", action="deny", result="denied") == 1
        assert count(policy="public-read", result="allowed") >= 6
        assert count(policy="gold-writes", result="allowed") == 1
        assert count(policy="partner", result="allowed") == 1
        assert tokens("invalid") == 2 * 2 + 4 + 1
        assert tokens("expired") == 1
        assert tokens("valid") >= 3
        assert requests(consumer_application="app-7", consumer_plan="gold") == 1
        assert requests(consumer_application="partner-42", consumer_plan="silver") == 1

        # A sidecar without an identity cannot verify: the header never reaches the app.
        r = httpx.get(
            f"http://127.0.0.1:{bare.inbound}/x", headers={"x-meshgate-consumer": gold}, timeout=10
        )
        assert r.status_code == 200
        assert "x-meshgate-consumer" not in r.json()["headers"]
        assert (
            metric(bare.metrics(), "meshgate_mesh_consumer_tokens_total", result="unverified") == 1
        )


def test_the_control_plane_stores_and_checks_policies(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    with running(cp):
        doc = {"name": "orders", "authorization": POLICIES}
        r = cp.api.put("/mesh/services/orders", json=doc)
        assert r.status_code == 201, r.text
        stored = cp.api.get("/mesh/services/orders").json()
        assert stored["authorization"][0] == POLICIES[0]
        assert stored["authorization"][2]["rules"][0]["consumer"] == {"plans": ["gold"]}
        bad = {
            "name": "orders",
            "authorization": [{"name": "p", "rules": [{"to": {"paths": ["/a*b"]}}]}],
        }
        r = cp.api.put("/mesh/services/orders", json=bad)
        assert r.status_code == 422
        assert "'*' may only start or end a value" in r.text
        assert "authorization[0].rules[0].to.paths" in r.text
        assert cp.api.post("/mesh/promote").status_code in (200, 201)
        r = cp.api.get("/mesh/snapshots", params={"env": "production"})
        assert r.status_code == 200


def test_identities_from_the_control_planes_ca_carry_the_consumer(tmp_path: Path) -> None:
    """Gateway and sidecar both take their identity from the CA (bootstrap tokens): the
    gateway signs, the sidecar verifies and authorizes by plan, the app reads the claims."""
    cp = start_control_plane(tmp_path)
    api = cp.api

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = api.post(path, json=body)
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    orders_token = post("/mesh/bootstrap-tokens", {"service": "orders"})["token"]
    gateway_token = post("/mesh/bootstrap-tokens", {"service": GATEWAY})["token"]
    cp.put_service(
        {"name": "orders", "authorization": [
            {"name": "gold-only", "rules": [{"consumer": {"plans": ["gold"]}}]},
        ]}
    )  # fmt: skip
    app = start_app(tmp_path, "orders")
    sidecar = attached_sidecar(
        tmp_path, cp, "orders", app.port, "--bootstrap-token", orders_token, "--drain-seconds", "1"
    )
    product = post(
        "/products",
        {
            "name": "shop",
            "path_prefix": "/shop",
            "auth": {"type": "api_key"},
            "backend": f"http://127.0.0.1:{sidecar.inbound}",
        },
    )
    account = post("/accounts", {"name": "acme"})
    keys = {}
    for plan_name in ("gold", "free"):
        plan = post(f"/products/{product['id']}/plans", {"name": plan_name, "state": "published"})
        created = post(
            "/applications",
            {"account_id": account["id"], "plan_id": plan["id"], "name": f"{plan_name} app"},
        )
        keys[plan_name] = created["key"]
    post(f"/products/{product['id']}/promote", {})
    port, admin = free_port(), free_port()
    settings = tmp_path / "gateway.yaml"
    settings.write_text(
        json.dumps(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "limits": {"backend": "memory"},
            }
        )
    )
    gateway = Proc(
        [
            "gateway", "--control-plane", cp.url, "--token", cp.token, "--config", str(settings),
            "--cache-dir", str(tmp_path / "gateway-cache"), "--bootstrap-token", gateway_token,
        ],
        tmp_path,
        "gateway",
    )  # fmt: skip
    # Stopped before the control plane: a sidecar leaves its registry as it drains.
    with running(gateway, sidecar, app, cp):
        wait_port(port, proc=gateway.popen, timeout=30)
        url = f"http://127.0.0.1:{port}/shop/hello"

        def answer(plan: str) -> httpx.Response:
            return httpx.get(url, headers={"x-api-key": keys[plan]}, timeout=10)

        within(15, lambda: answer("gold").status_code == 200, "the gold application served")
        claims = jwt.decode(
            answer("gold").json()["headers"]["x-meshgate-consumer"],
            options={"verify_signature": False},
        )
        assert claims["iss"] == f"spiffe://meshgate.local/ns/production/sa/{GATEWAY}"
        assert (claims["product"], claims["plan"], claims["account"]) == ("shop", "gold", "acme")
        assert claims["application"]["name"] == "gold app"
        refused = answer("free")
        assert refused.status_code == 403
        assert "no allow policy" in refused.json()["detail"]
