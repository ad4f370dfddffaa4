"""Create, read, update, delete and list every resource of the admin API, on each store."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from control_support import (
    ControlPlane,
    etag_of,
    full_product,
    make_product,
    problem,
)


@dataclass
class Spec:
    """One resource: where it is created, what it is created and updated with, its filters."""

    name: str
    collection: Callable[[dict[str, Any]], str]
    item: str
    create: Callable[[dict[str, Any]], dict[str, Any]]
    update: dict[str, Any]
    filters: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = lambda _w, _r: {}
    deletable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _world(cp: ControlPlane) -> dict[str, Any]:
    """What the resources under test hang from: a product with hits, an account, a plan."""
    suffix = uuid.uuid4().hex[:6]
    product = make_product(cp, name=f"crud-{suffix}", path_prefix=f"/crud-{suffix}")
    [hits] = cp.api.get(f"/products/{product['id']}/metrics").json()["items"]
    account = cp.post("/accounts", {"name": f"owner-{suffix}"})
    plan = cp.post(f"/products/{product['id']}/plans", {"name": "base", "state": "published"})
    return {"product": product, "hits": hits, "account": account, "plan": plan, "suffix": suffix}


SPECS = [
    Spec(
        "accounts",
        lambda w: "/accounts",
        "/accounts",
        lambda w: {"name": f"acme-{w['suffix']}", "email": "ops@acme.example", "state": "pending"},
        {"description": "a developer organisation", "state": "approved"},
        lambda w, r: {"name": r["name"], "state": "approved"},
    ),
    Spec(
        "users",
        lambda w: f"/accounts/{w['account']['id']}/users",
        "/users",
        lambda w: {"username": "ada", "email": "ada@acme.example"},
        {"role": "admin"},
        lambda w, r: {"role": "admin", "state": "active"},
    ),
    Spec(
        "products",
        lambda w: "/products",
        "/products",
        lambda w: {
            "name": f"shop-{w['suffix']}",
            "path_prefix": f"/shop-{w['suffix']}/",
            "auth": {"type": "app_id_key"},
            "backend": "http://127.0.0.1:9",
        },
        {"description": "the shop", "hosts": ["shop.example.com"], "max_body_size": 2**40},
        lambda w, r: {"name": r["name"]},
        extra={"path_prefix": lambda w: f"/shop-{w['suffix']}"},
    ),
    Spec(
        "backends",
        lambda w: f"/products/{w['product']['id']}/backends",
        "/backends",
        lambda w: {"path": "/v2", "url": "http://127.0.0.1:9/v2", "name": "v2"},
        {"url": "http://[::1]:9/v2"},
    ),
    Spec(
        "metrics",
        lambda w: f"/products/{w['product']['id']}/metrics",
        "/metrics",
        lambda w: {"name": "search", "parent_id": w["hits"]["id"], "unit": "call"},
        {"friendly_name": "Search", "description": "a method of hits"},
        lambda w, r: {"parent_id": w["hits"]["id"], "name": "search"},
    ),
    Spec(
        "mapping_rules",
        lambda w: f"/products/{w['product']['id']}/mapping_rules",
        "/mapping_rules",
        lambda w: {"http_method": "GET", "pattern": "/items/{id}$", "metric_id": w["hits"]["id"]},
        {"delta": 3, "last": True, "position": 7},
        lambda w, r: {"metric_id": w["hits"]["id"]},
    ),
    Spec(
        "plans",
        lambda w: f"/products/{w['product']['id']}/plans",
        "/plans",
        lambda w: {"name": "gold", "setup_fee": "10.5", "monthly_fee": "99", "trial_days": 30},
        {"state": "deprecated", "is_default": True},
        lambda w, r: {"name": "gold", "state": "deprecated"},
    ),
    Spec(
        "limits",
        lambda w: f"/plans/{w['plan']['id']}/limits",
        "/limits",
        lambda w: {"metric_id": w["hits"]["id"], "period": "day", "value": 2**62},
        {"value": 0},
        lambda w, r: {"metric_id": w["hits"]["id"], "period": "day"},
    ),
    Spec(
        "pricing_rules",
        lambda w: f"/plans/{w['plan']['id']}/pricing_rules",
        "/pricing_rules",
        lambda w: {"metric_id": w["hits"]["id"], "min": 1, "max": 1000, "cost_per_unit": "0.0125"},
        {"max": None, "cost_per_unit": "0.01"},
        lambda w, r: {"metric_id": w["hits"]["id"]},
    ),
    Spec(
        "applications",
        lambda w: "/applications",
        "/applications",
        lambda w: {"account_id": w["account"]["id"], "plan_id": w["plan"]["id"], "name": "web"},
        {"description": "the web shop"},
        lambda w, r: {
            "account_id": w["account"]["id"],
            "plan_id": w["plan"]["id"],
            "product_id": w["product"]["id"],
            "state": "live",
        },
    ),
]


def same(actual: Any, sent: Any) -> bool:
    """What was sent is what is shown: money as equal decimals, objects with their defaults."""
    if isinstance(sent, dict):
        return all(same(actual.get(k), v) for k, v in sent.items())
    if isinstance(sent, str) and isinstance(actual, str) and sent[:1].isdigit():
        try:
            return Decimal(actual) == Decimal(sent)
        except ArithmeticError:
            pass
    return bool(actual == sent)


def _walk(cp: ControlPlane, spec: Spec) -> None:
    world = _world(cp)
    body = spec.create(world)
    created = cp.api.post(spec.collection(world), json=body)
    assert created.status_code == 201, (spec.name, created.text)
    row = created.json()
    if spec.name == "applications":
        # The first key is shown in the creation's response, and never again.
        assert len(row.pop("key")) >= 32
    location = created.headers["location"]
    assert location == f"/admin/api{spec.item}/{row['id']}"
    assert etag_of(created) == f'"{row["version"]}"'
    for key, value in body.items():
        expected = spec.extra.get(key, lambda w, v=value: v)(world)
        if key != "backend":
            assert same(row[key], expected), (spec.name, key, row[key])

    read = cp.api.get(location.removeprefix("/admin/api"))
    assert read.status_code == 200 and read.json() == row
    assert etag_of(read) == etag_of(created)

    listed = cp.api.get(spec.collection(world), params={"per_page": 500})
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert row in page["items"] and page["total"] == len(page["items"])
    assert page["page"] == 1 and page["per_page"] == 500

    updated = cp.api.patch(f"{spec.item}/{row['id']}", json=spec.update)
    assert updated.status_code == 200, (spec.name, updated.text)
    after = updated.json()
    for key, value in spec.update.items():
        assert same(after[key], value), (spec.name, key, after[key])
    assert after["version"] == row["version"] + 1
    assert etag_of(updated) == f'"{after["version"]}"' != etag_of(created)
    assert after["updated_at"] >= row["updated_at"]

    matching = cp.api.get(spec.collection(world), params=spec.filters(world, after)).json()
    assert [i["id"] for i in matching["items"]].count(row["id"]) == 1, (spec.name, matching)
    assert matching["total"] == len(matching["items"])

    if spec.name == "applications":
        return  # deleted in its own test, with its keys
    gone = cp.api.delete(f"{spec.item}/{row['id']}")
    assert gone.status_code == 204, (spec.name, gone.text)
    assert gone.content == b""
    problem(cp.api.get(f"{spec.item}/{row['id']}"), 404)
    problem(cp.api.patch(f"{spec.item}/{row['id']}", json=spec.update), 404)
    problem(cp.api.delete(f"{spec.item}/{row['id']}"), 404)


def test_every_resource_is_created_read_listed_updated_and_deleted(control: ControlPlane) -> None:
    for spec in SPECS:
        _walk(control, spec)


def test_applications_keys_and_tokens_are_created_listed_and_deleted(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    ids = full_product(cp, f"keys-{uuid.uuid4().hex[:6]}")
    app = ids["application"]
    keys = cp.api.get(f"/applications/{app['id']}/keys").json()
    assert [k["hint"] for k in keys] == [app["key"][:4] + "…"]

    mine = cp.api.post(f"/applications/{app['id']}/keys", json={"key": "my-own-key-0123456789"})
    assert mine.status_code == 201 and mine.json()["key"] == "my-own-key-0123456789"
    generated = cp.post(f"/applications/{app['id']}/keys", {})
    assert len(generated["key"]) >= 32 and generated["key"] != app["key"]
    listed = cp.api.get(f"/applications/{app['id']}/keys").json()
    assert [k["id"] for k in listed] == sorted(k["id"] for k in listed)
    assert len(listed) == 3 and all("key" not in k for k in listed)

    assert cp.api.delete(f"/applications/{app['id']}/keys/{mine.json()['id']}").status_code == 204
    problem(cp.api.delete(f"/applications/{app['id']}/keys/{mine.json()['id']}"), 404)
    assert len(cp.api.get(f"/applications/{app['id']}/keys").json()) == 2

    # A key is the application's: another application's key id is not found here.
    other = cp.post(
        "/applications",
        {"account_id": ids["account"]["id"], "plan_id": ids["plan"]["id"], "name": "other"},
    )
    problem(cp.api.delete(f"/applications/{other['id']}/keys/{generated['id']}"), 404)

    assert cp.api.delete(f"/applications/{app['id']}").status_code == 204
    problem(cp.api.get(f"/applications/{app['id']}"), 404)
    problem(cp.api.get(f"/applications/{app['id']}/keys"), 404)
    problem(cp.api.post(f"/applications/{app['id']}/keys", json={}), 404)

    token = cp.api.post("/tokens", json={"name": f"ci-{uuid.uuid4().hex[:6]}", "scopes": ["read"]})
    assert token.status_code == 201
    assert token.json()["token"].startswith("mgt_")
    tokens = cp.api.get("/tokens").json()
    assert [t["name"] for t in tokens if t["id"] == token.json()["id"]] == [token.json()["name"]]
    assert all("token" not in t for t in tokens)
    assert cp.api.delete(f"/tokens/{token.json()['id']}").status_code == 204
    problem(cp.api.delete(f"/tokens/{token.json()['id']}"), 404)
    assert token.json()["id"] not in [t["id"] for t in cp.api.get("/tokens").json()]


def test_lists_are_paginated_with_totals_and_filtered(control_shared: ControlPlane) -> None:
    cp = control_shared
    product = make_product(cp, name=f"pages-{uuid.uuid4().hex[:6]}", path_prefix="/pages")
    [hits] = cp.api.get(f"/products/{product['id']}/metrics").json()["items"]
    methods = [
        cp.post(f"/products/{product['id']}/metrics", {"name": f"m{i}", "parent_id": hits["id"]})
        for i in range(5)
    ]
    cp.post(f"/products/{product['id']}/metrics", {"name": "bytes", "unit": "byte"})
    url = f"/products/{product['id']}/metrics"

    seen = []
    for number, size in ((1, 3), (2, 3), (3, 1)):
        page = cp.api.get(url, params={"page": number, "per_page": 3}).json()
        assert (page["page"], page["per_page"], page["total"]) == (number, 3, 7)
        assert len(page["items"]) == size
        seen += [m["id"] for m in page["items"]]
    assert seen == sorted(seen) and len(set(seen)) == 7
    beyond = cp.api.get(url, params={"page": 4, "per_page": 3}).json()
    assert beyond["items"] == [] and beyond["total"] == 7

    children = cp.api.get(url, params={"parent_id": hits["id"]}).json()
    assert [m["id"] for m in children["items"]] == [m["id"] for m in methods]
    assert children["total"] == 5
    assert cp.api.get(url, params={"name": "bytes"}).json()["total"] == 1
    assert cp.api.get(url, params={"name": "nothing"}).json() == {
        "items": [],
        "page": 1,
        "per_page": 50,
        "total": 0,
    }

    for params, name in (
        ({"per_page": 0}, "query.per_page"),
        ({"per_page": 501}, "query.per_page"),
        ({"page": 0}, "query.page"),
        ({"page": "two"}, "query.page"),
        ({"parent_id": 0}, "query.parent_id"),
        ({"parent_id": 2**31}, "query.parent_id"),
        ({"name": "x" * 201}, "query.name"),
    ):
        problem(cp.api.get(url, params=params), 422, name)

    # A collection under a parent that does not exist is a 404, not an empty page.
    problem(cp.api.get("/products/2147483647/metrics"), 404)
    problem(cp.api.post("/products/2147483647/metrics", json={"name": "x"}), 404)
    problem(cp.api.get("/plans/2147483647/limits"), 404)
    problem(cp.api.get("/accounts/2147483647/users"), 404)


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/2147483647",
        "/users/2147483647",
        "/products/2147483647",
        "/backends/2147483647",
        "/metrics/2147483647",
        "/mapping_rules/2147483647",
        "/plans/2147483647",
        "/limits/2147483647",
        "/pricing_rules/2147483647",
        "/applications/2147483647",
    ],
)
def test_a_missing_resource_is_404_for_read_update_and_delete(
    control_shared: ControlPlane, path: str
) -> None:
    detail = problem(control_shared.api.get(path), 404)["detail"]
    assert "2147483647 does not exist" in detail
    problem(control_shared.api.patch(path, json={}), 404)
    problem(control_shared.api.delete(path), 404)


def test_an_empty_patch_changes_nothing_and_null_keeps_a_required_field(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    account = cp.post("/accounts", {"name": f"same-{uuid.uuid4().hex[:6]}", "email": "a@b.c"})
    same = cp.api.patch(f"/accounts/{account['id']}", json={})
    assert same.status_code == 200 and same.json()["version"] == account["version"]
    kept = cp.api.patch(f"/accounts/{account['id']}", json={"name": None, "email": None})
    assert kept.json()["name"] == account["name"]
    # email may be empty: null clears it.
    assert kept.json()["email"] is None


def test_a_default_plan_is_the_only_default_of_its_product(control_shared: ControlPlane) -> None:
    cp = control_shared
    product = make_product(cp, name=f"defaults-{uuid.uuid4().hex[:6]}", path_prefix="/d")
    first = cp.post(f"/products/{product['id']}/plans", {"name": "a", "is_default": True})
    second = cp.post(f"/products/{product['id']}/plans", {"name": "b", "is_default": True})
    plans = cp.api.get(f"/products/{product['id']}/plans").json()["items"]
    assert {p["name"]: p["is_default"] for p in plans} == {"a": False, "b": True}
    # The first plan changed, so its ETag did too: a client holding the old one gets 412.
    problem(
        cp.api.patch(
            f"/plans/{first['id']}", json={"is_default": True}, headers={"If-Match": '"1"'}
        ),
        412,
    )
    again = cp.api.patch(f"/plans/{second['id']}", json={"is_default": True})
    assert again.status_code == 200 and again.json()["is_default"] is True
