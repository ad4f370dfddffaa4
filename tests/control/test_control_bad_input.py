"""Every invalid request is a 4xx problem naming the field, and a refused change leaves
nothing behind: no row, no audit entry, no staged configuration."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import httpx
import pytest
from control_support import (
    ControlPlane,
    audit,
    dump_database,
    full_product,
    make_product,
    problem,
)


def _product(cp: ControlPlane, **fields: Any) -> dict[str, Any]:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    return make_product(cp, name=name, path_prefix=f"/{name}", **fields)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": 5, "auth": {"type": "api_key"}}, "body.name"),
        ({"auth": {"type": "api_key"}}, "body.name"),
        ({"name": "x"}, "body.auth"),
        ({"name": "x", "auth": {"type": "api_key"}, "colour": "red"}, "body.colour"),
        ({"name": "has space", "auth": {"type": "api_key"}}, "body.name"),
        ({"name": "x" * 201, "auth": {"type": "api_key"}}, "body.name"),
        ({"name": "x", "auth": {"type": "saml"}}, "body.auth"),
        ({"name": "x", "auth": {"type": "api_key", "header": "a\x00b"}}, "body.auth.header"),
        ({"name": "x", "auth": {"type": "api_key"}, "description": "\x00"}, "body.description"),
        ({"name": "x", "auth": {"type": "api_key"}, "hosts": ["a\x00"]}, "body.hosts"),
        ({"name": "x", "auth": {"type": "api_key"}, "hosts": "a.example"}, "body.hosts"),
        ({"name": "x", "auth": {"type": "api_key"}, "path_prefix": "no-slash"}, "body.path_prefix"),
        ({"name": "x", "auth": {"type": "api_key"}, "path_prefix": "/a/../b"}, "body.path_prefix"),
        ({"name": "x", "auth": {"type": "api_key"}, "backend": "ftp://h"}, "body.backend"),
        ({"name": "x", "auth": {"type": "api_key"}, "max_body_size": 2**63}, "body.max_body_size"),
        ({"name": "x", "auth": {"type": "api_key"}, "max_body_size": -1}, "body.max_body_size"),
        (
            {"name": "x", "auth": {"type": "api_key"}, "max_body_size": 10**30},
            "body.max_body_size",
        ),
        (
            {"name": "x", "auth": {"type": "api_key"}, "upstream_connect_timeout": 0},
            "body.upstream_connect_timeout",
        ),
        (
            {"name": "x", "auth": {"type": "api_key"}, "policies": [{"a": {}, "b": {}}]},
            "body.policies[0]",
        ),
        (
            {"name": "x", "auth": {"type": "api_key"}, "policies": [{"cors": {"k\x00": 1}}]},
            "body.policies",
        ),
        ({"name": "x", "auth": {"type": "jwt"}}, "body.auth"),
    ],
)
def test_an_invalid_product_is_refused_naming_the_field(
    control_shared: ControlPlane, body: dict[str, Any], field: str
) -> None:
    body = {**body}
    problem(control_shared.api.post("/products", json=body), 422, field)


def test_invalid_values_of_each_resource_name_their_field(control_shared: ControlPlane) -> None:
    cp = control_shared
    ids = full_product(cp, f"fields-{uuid.uuid4().hex[:6]}")
    product_id, plan_id = ids["product"]["id"], ids["plan"]["id"]
    hits_id, app_id = ids["hits"]["id"], ids["application"]["id"]
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("post", "/accounts", {"name": ""}, "body.name"),
        ("post", "/accounts", {"name": "a", "email": "not-an-email"}, "body.email"),
        ("post", "/accounts", {"name": "a", "state": "happy"}, "body.state"),
        ("post", "/accounts", {"name": "a", "description": "x" * 10_001}, "body.description"),
        ("post", f"/accounts/{ids['account']['id']}/users", {"email": "a@b.c"}, "body.username"),
        ("post", f"/products/{product_id}/backends", {"url": "http://h", "path": "x"}, "body.path"),
        ("post", f"/products/{product_id}/backends", {"url": "gopher://h"}, "body.url"),
        ("post", f"/products/{product_id}/backends", {"url": "http://h/\x00"}, "body.url"),
        ("post", f"/products/{product_id}/metrics", {"name": "a b"}, "body.name"),
        (
            "post",
            f"/products/{product_id}/metrics",
            {"name": "m", "parent_id": 0},
            "body.parent_id",
        ),
        (
            "post",
            f"/products/{product_id}/metrics",
            {"name": "m", "parent_id": ids["method"]["id"]},
            "body.parent_id",
        ),
        (
            "post",
            f"/products/{product_id}/mapping_rules",
            {"pattern": "no-slash", "metric_id": hits_id},
            "body.pattern",
        ),
        (
            "post",
            f"/products/{product_id}/mapping_rules",
            {"pattern": "/x", "metric_id": hits_id, "http_method": "BREW"},
            "body.http_method",
        ),
        (
            "post",
            f"/products/{product_id}/mapping_rules",
            {"pattern": "/x", "metric_id": hits_id, "delta": 10**7},
            "body.delta",
        ),
        (
            "post",
            f"/products/{product_id}/mapping_rules",
            {"pattern": "/x", "metric_id": 2**31},
            "body.metric_id",
        ),
        ("post", f"/products/{product_id}/plans", {"name": "p", "setup_fee": -1}, "body.setup_fee"),
        (
            "post",
            f"/products/{product_id}/plans",
            {"name": "p", "setup_fee": "NaN"},
            "body.setup_fee",
        ),
        (
            "post",
            f"/products/{product_id}/plans",
            {"name": "p", "monthly_fee": "0.00001"},
            "body.monthly_fee",
        ),
        (
            "post",
            f"/products/{product_id}/plans",
            {"name": "p", "monthly_fee": 1e20},
            "body.monthly_fee",
        ),
        (
            "post",
            f"/products/{product_id}/plans",
            {"name": "p", "trial_days": 2**64},
            "body.trial_days",
        ),
        (
            "post",
            f"/plans/{plan_id}/limits",
            {"metric_id": hits_id, "period": "fortnight", "value": 1},
            "body.period",
        ),
        (
            "post",
            f"/plans/{plan_id}/limits",
            {"metric_id": hits_id, "period": "day", "value": 2**63},
            "body.value",
        ),
        (
            "post",
            f"/plans/{plan_id}/limits",
            {"metric_id": hits_id, "period": "day", "value": "5"},
            "body.value",
        ),
        (
            "post",
            f"/plans/{plan_id}/pricing_rules",
            {"metric_id": hits_id, "min": 10, "max": 5, "cost_per_unit": 1},
            "body.max",
        ),
        (
            "post",
            f"/plans/{plan_id}/pricing_rules",
            {"metric_id": hits_id, "cost_per_unit": "Infinity"},
            "body.cost_per_unit",
        ),
        (
            "post",
            "/applications",
            {"account_id": 2**31 - 1, "plan_id": plan_id, "name": "a"},
            "body.account_id",
        ),
        (
            "post",
            "/applications",
            {"account_id": ids["account"]["id"], "plan_id": 2**31 - 1, "name": "a"},
            "body.plan_id",
        ),
        (
            "post",
            "/applications",
            {"account_id": ids["account"]["id"], "plan_id": plan_id, "name": "a", "app_id": "a b"},
            "body.app_id",
        ),
        ("post", f"/applications/{app_id}/keys", {"key": "short"}, "body.key"),
        ("post", f"/applications/{app_id}/keys", {"key": "a key with spaces in it"}, "body.key"),
        ("post", "/tokens", {"name": "t", "scopes": []}, "body.scopes"),
        ("post", "/tokens", {"name": "t", "scopes": ["root"]}, "body.scopes[0]"),
        (
            "post",
            "/tokens",
            {"name": "t", "scopes": ["read"], "expires_at": "0001-01-01T00:00:00+14:00"},
            "body.expires_at",
        ),
        (
            "patch",
            f"/products/{product_id}",
            {"auth": {"type": "none"}},
            "body.auth.default_application",
        ),
        ("patch", f"/products/{product_id}", {"strip_prefix": "yes please"}, "body.strip_prefix"),
        ("patch", f"/metrics/{hits_id}", {"name": "renamed"}, "body.name"),
        ("patch", f"/metrics/{hits_id}", {"parent_id": 1}, "body.parent_id"),
        ("patch", f"/limits/{ids['limit']['id']}", {"metric_id": hits_id}, "body.metric_id"),
        ("patch", f"/applications/{app_id}", {"state": "live"}, "body.state"),
        ("patch", f"/applications/{app_id}", {"plan_id": plan_id}, "body.plan_id"),
        ("post", f"/applications/{app_id}/change_plan", {}, "body.plan_id"),
    ]
    for method, path, body, field in cases:
        response = cp.api.request(method, path, json=body)
        problem(response, 422, field)


def test_malformed_bodies_are_refused(control_shared: ControlPlane) -> None:
    cp = control_shared
    json_type = {"content-type": "application/json"}
    # Malformed JSON is 400, as on integration routes; JSON of the wrong shape is 422.
    problem(cp.api.post("/accounts", content=b'{"name": "a",', headers=json_type), 400, "body")
    problem(cp.api.post("/accounts", content=b"[1, 2]", headers=json_type), 422, "body")
    problem(cp.api.post("/accounts", content=b'"a"', headers=json_type), 422, "body")
    problem(cp.api.post("/accounts", content=b"", headers=json_type), 422, "body")
    problem(cp.api.post("/accounts", content=b"\xff\xfe", headers=json_type), 400, "body")
    # A JSON lone surrogate cannot be stored as text on either database.
    surrogate = b'{"name": "a\\ud800"}'
    problem(cp.api.post("/accounts", content=surrogate, headers=json_type), 422, "body.name")
    problem(
        cp.api.post("/products", content=_nested_policy(b'"\\udfff"'), headers=json_type),
        422,
        "body.policies",
    )
    problem(
        cp.api.post("/products", content=_nested_policy(b"NaN"), headers=json_type),
        422,
        "body.policies",
    )
    huge = b'{"name": "a", "description": ' + b"9" * 5000 + b"}"
    problem(cp.api.post("/accounts", content=huge, headers=json_type), 400, "body")
    deep = b"[" * 100_000 + b"]" * 100_000
    problem(cp.api.post("/accounts", content=deep, headers=json_type), 400, "body")

    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = cp.api.post(
            "/accounts", content=b'{"name": "typed"}', headers={"content-type": content_type}
        )
        problem(response, 415, "header.content-type")
    assert cp.api.get("/accounts", params={"name": "typed"}).json()["total"] == 0
    # A JSON media type with parameters or a +json suffix is JSON.
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        name = f"typed-{uuid.uuid4().hex[:6]}"
        response = cp.api.post(
            "/accounts", content=f'{{"name": "{name}"}}', headers={"content-type": content_type}
        )
        assert response.status_code == 201, response.text


def _nested_policy(value: bytes) -> bytes:
    return (
        b'{"name": "n", "auth": {"type": "api_key"}, "policies": [{"cors": {"x": ' + value + b"}}]}"
    )


def test_ids_out_of_range_are_refused_naming_the_path_parameter(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    for path, field in (
        ("/accounts/0", "path.item_id"),
        ("/accounts/-1", "path.item_id"),
        ("/accounts/2147483648", "path.item_id"),
        ("/accounts/99999999999999999999999999", "path.item_id"),
        ("/accounts/abc", "path.item_id"),
        ("/accounts/1.5", "path.item_id"),
        ("/products/0/metrics", "path.product_id"),
        ("/plans/2147483648/limits", "path.plan_id"),
        ("/environments/staging/snapshots/2147483648", "path.version"),
        ("/environments/qa/snapshots", "path.env"),
    ):
        problem(cp.api.get(path), 422, field)
    problem(cp.api.delete("/applications/1/keys/0"), 422, "path.key_id")
    problem(cp.api.post("/environments/production/rollback", params={"to": 0}), 422, "query.to")
    problem(cp.api.post("/environments/production/rollback"), 422, "query.to")
    for params, field in (
        ({"name": "a\x00"}, "query.name"),
        ({"state": "x" * 201}, "query.state"),
    ):
        problem(cp.api.get("/accounts", params=params), 422, field)
    problem(cp.api.get("/audit", params={"actor": "\x00"}), 422, "query.actor")


def test_oversized_bodies_are_413(control_shared: ControlPlane) -> None:
    from meshgate.control.app import MAX_BODY

    cp = control_shared
    # Announced: refused before a byte of the body is read.
    head = (
        "POST /admin/api/accounts HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {cp.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", cp.port), timeout=10) as sock:
        sock.sendall(head.encode())
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "application/problem+json" in reply

    # Streamed without a length: refused once it passes the limit.
    def chunks() -> Any:
        yield b'{"name": "big", "description": "'
        block = b"x" * (1 << 20)
        for _ in range(MAX_BODY // len(block) + 1):
            yield block
        yield b'"}'

    response = httpx.post(
        f"{cp.url}/admin/api/accounts",
        content=chunks(),
        headers={"Authorization": f"Bearer {cp.token}", "content-type": "application/json"},
        timeout=60,
    )
    problem(response, 413)
    assert cp.api.get("/accounts", params={"name": "big"}).json()["total"] == 0


def test_references_across_products_are_refused(control_shared: ControlPlane) -> None:
    cp = control_shared
    one = full_product(cp, f"one-{uuid.uuid4().hex[:6]}")
    two = full_product(cp, f"two-{uuid.uuid4().hex[:6]}")
    theirs = two["method"]["id"]
    problem(
        cp.api.post(
            f"/products/{one['product']['id']}/mapping_rules",
            json={"pattern": "/x", "metric_id": theirs},
        ),
        422,
        "body.metric_id",
    )
    problem(
        cp.api.patch(f"/mapping_rules/{one['rule']['id']}", json={"metric_id": theirs}),
        422,
        "body.metric_id",
    )
    problem(
        cp.api.post(
            f"/products/{one['product']['id']}/metrics", json={"name": "m", "parent_id": theirs}
        ),
        422,
        "body.parent_id",
    )
    problem(
        cp.api.post(
            f"/plans/{one['plan']['id']}/limits",
            json={"metric_id": theirs, "period": "day", "value": 1},
        ),
        422,
        "body.metric_id",
    )
    problem(
        cp.api.post(
            f"/plans/{one['plan']['id']}/pricing_rules",
            json={"metric_id": theirs, "cost_per_unit": 1},
        ),
        422,
        "body.metric_id",
    )
    problem(
        cp.api.post(
            f"/applications/{one['application']['id']}/change_plan",
            json={"plan_id": two["plan"]["id"]},
        ),
        422,
        "body.plan_id",
    )
    app = cp.api.get(f"/applications/{one['application']['id']}").json()
    assert app["plan_id"] == one["plan"]["id"] and app["version"] == 1
    rule = cp.api.get(f"/mapping_rules/{one['rule']['id']}").json()
    assert rule["metric_id"] == one["method"]["id"]


def test_conflicts_are_409_naming_the_field(control_shared: ControlPlane) -> None:
    cp = control_shared
    ids = full_product(cp, f"dup-{uuid.uuid4().hex[:6]}")
    product = ids["product"]
    problem(
        cp.api.post("/products", json={"name": product["name"], "auth": {"type": "api_key"}}),
        409,
        "body.name",
    )
    problem(cp.api.post("/accounts", json={"name": ids["account"]["name"]}), 409, "body.name")
    problem(
        cp.api.post(f"/products/{product['id']}/plans", json={"name": "basic"}), 409, "body.name"
    )
    problem(
        cp.api.post(f"/products/{product['id']}/metrics", json={"name": "hits"}), 409, "body.name"
    )
    problem(
        cp.api.post(
            f"/plans/{ids['plan']['id']}/limits",
            json={"metric_id": ids["hits"]["id"], "period": "minute", "value": 9},
        ),
        409,
        "body.period",
    )
    app = ids["application"]
    problem(
        cp.api.post(
            "/applications",
            json={
                "account_id": ids["account"]["id"],
                "plan_id": ids["plan"]["id"],
                "name": "again",
                "app_id": app["app_id"],
            },
        ),
        409,
        "body.app_id",
    )
    problem(
        cp.api.post(f"/applications/{app['id']}/keys", json={"key": app["key"]}), 409, "body.key"
    )
    name = f"tok-{uuid.uuid4().hex[:6]}"
    assert cp.api.post("/tokens", json={"name": name, "scopes": ["read"]}).status_code == 201
    problem(cp.api.post("/tokens", json={"name": name, "scopes": ["read"]}), 409, "body.name")


def test_deletes_that_would_break_the_model_are_refused(control_shared: ControlPlane) -> None:
    cp = control_shared
    ids = full_product(cp, f"keep-{uuid.uuid4().hex[:6]}")
    problem(cp.api.delete(f"/metrics/{ids['hits']['id']}"), 409)
    problem(cp.api.delete(f"/products/{ids['product']['id']}"), 409)
    problem(cp.api.delete(f"/plans/{ids['plan']['id']}"), 409)
    for path in (f"/metrics/{ids['hits']['id']}", f"/products/{ids['product']['id']}"):
        assert cp.api.get(path).status_code == 200
    # Without its applications, the product goes, and everything under it.
    assert cp.api.delete(f"/applications/{ids['application']['id']}").status_code == 204
    assert cp.api.delete(f"/products/{ids['product']['id']}").status_code == 204
    for path in (
        f"/metrics/{ids['method']['id']}",
        f"/mapping_rules/{ids['rule']['id']}",
        f"/plans/{ids['plan']['id']}",
        f"/limits/{ids['limit']['id']}",
        f"/pricing_rules/{ids['pricing']['id']}",
    ):
        problem(cp.api.get(path), 404)


def test_overlapping_pricing_rules_are_refused(control_shared: ControlPlane) -> None:
    cp = control_shared
    ids = full_product(cp, f"tiers-{uuid.uuid4().hex[:6]}")
    plan, hits = ids["plan"]["id"], ids["hits"]["id"]
    url = f"/plans/{plan}/pricing_rules"
    # 1..100 exists; 101..1000 and 1001.. tile the rest.
    second = cp.post(url, {"metric_id": hits, "min": 101, "max": 1000, "cost_per_unit": "0.005"})
    cp.post(url, {"metric_id": hits, "min": 1001, "cost_per_unit": "0.001"})
    for low, high in ((50, 60), (100, 101), (1, None), (5000, None), (900, 1100)):
        problem(
            cp.api.post(url, json={"metric_id": hits, "min": low, "max": high, "cost_per_unit": 1}),
            422,
            "body.min",
        )
    problem(cp.api.patch(f"/pricing_rules/{second['id']}", json={"max": 2000}), 422, "body.min")
    problem(cp.api.patch(f"/pricing_rules/{second['id']}", json={"min": 2000}), 422, "body.max")
    # Another metric's tiers are its own.
    cp.post(url, {"metric_id": ids["method"]["id"], "min": 1, "cost_per_unit": "0.2"})
    assert cp.api.get(url).json()["total"] == 4


def test_a_refused_change_leaves_no_row_and_no_audit_entry(control: ControlPlane) -> None:
    """One transaction per change, on each store: a refusal found after rows were written
    (a name found taken when the row is flushed) undoes the whole change; values a store
    cannot hold (NUL, 2**63) are refused before they reach it."""
    cp = control
    ids = full_product(cp, "whole")
    other = make_product(cp, name="other", path_prefix="/other")
    before = dump_database(cp.database_url)
    entries = len(audit(cp))

    product_id = ids["product"]["id"]
    refusals = [
        (cp.api.post("/products", json={"name": "other", "auth": {"type": "api_key"}}), 409),
        (cp.api.post(f"/products/{product_id}/plans", json={"name": "basic"}), 409),
        (
            cp.api.patch(
                f"/products/{other['id']}", json={"description": "renamed", "name": "whole"}
            ),
            409,
        ),
        (
            cp.api.post(
                "/applications",
                json={
                    "account_id": ids["account"]["id"],
                    "plan_id": ids["plan"]["id"],
                    "name": "twin",
                    "app_id": ids["application"]["app_id"],
                },
            ),
            409,
        ),
        (
            cp.api.post(
                f"/products/{product_id}/mapping_rules",
                json={"pattern": "/x", "metric_id": 2**31 - 1},
            ),
            422,
        ),
        (cp.api.post("/accounts", json={"name": "nul\x00"}), 422),
        (cp.api.get("/accounts", params={"name": "nul\x00"}), 422),
        (
            cp.api.post(
                f"/plans/{ids['plan']['id']}/limits",
                json={"metric_id": ids["method"]["id"], "period": "day", "value": 2**63},
            ),
            422,
        ),
        (cp.api.delete(f"/metrics/{ids['hits']['id']}"), 409),
        (cp.api.delete(f"/products/{product_id}"), 409),
    ]
    assert [r.status_code for r, _ in refusals] == [status for _, status in refusals], [
        r.text for r, _ in refusals
    ]
    after = dump_database(cp.database_url)
    # Reads touch nothing but a token's last use; compiles of the setup may still land.
    for rows in (before, after):
        rows.pop("admin_tokens"), rows.pop("snapshots")
    assert after == before
    assert len(audit(cp)) == entries
