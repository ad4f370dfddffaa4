"""The audit log: who changed what, with the resource before and after, filterable."""

from __future__ import annotations

import httpx
from control_support import ControlPlane, audit, make_product, make_subscription


def test_every_change_is_audited_with_who_what_before_and_after(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    operator = cp.post("/tokens", {"name": "alice", "scopes": ["read", "write"]})
    alice = httpx.Client(
        base_url=f"{cp.url}/admin/api",
        headers={"Authorization": f"Bearer {operator['token']}"},
        timeout=30,
    )
    product = alice.post(
        "/products",
        json={"name": "shop", "path_prefix": "/shop", "auth": {"type": "api_key"}},
    ).json()
    alice.post(f"/products/{product['id']}/backends", json={"url": "http://127.0.0.1:9"})
    alice.patch(f"/products/{product['id']}", json={"description": "the shop"})
    sub = make_subscription(cp, product["id"])
    app = sub["application"]
    alice.post(f"/applications/{app['id']}/suspend")
    alice.post(f"/applications/{app['id']}/resume")
    key = alice.post(f"/applications/{app['id']}/keys", json={}).json()
    alice.delete(f"/applications/{app['id']}/keys/{key['id']}")
    promoted = alice.post(f"/products/{product['id']}/promote").json()
    alice.patch(f"/products/{product['id']}", json={"path_prefix": "/store"})
    alice.post(f"/products/{product['id']}/promote")
    alice.post("/environments/production/rollback", params={"to": promoted["version"]})
    metric = alice.post(f"/products/{product['id']}/metrics", json={"name": "gone"}).json()
    alice.delete(f"/metrics/{metric['id']}")

    mine = audit(cp, actor="alice")
    assert all(e["actor"] == "alice" for e in mine)
    actions = [(e["action"], e["resource"]) for e in reversed(mine)]
    assert actions == [
        ("create", "product"),
        ("create", "backend"),
        ("update", "product"),
        ("suspend", "application"),
        ("resume", "application"),
        ("create", "application_key"),
        ("delete", "application_key"),
        ("promote", "product"),
        ("update", "product"),
        ("promote", "product"),
        ("rollback", "environment"),
        ("create", "metric"),
        ("delete", "metric"),
    ]
    entries = mine  # newest first

    created = next(e for e in entries if e["action"] == "create" and e["resource"] == "product")
    assert created["before"] is None and created["after"]["name"] == "shop"
    assert created["resource_id"] == str(product["id"])

    first_update = [e for e in entries if e["action"] == "update"][-1]
    assert first_update["before"]["description"] == ""
    assert first_update["after"]["description"] == "the shop"
    assert first_update["after"]["version"] == first_update["before"]["version"] + 1

    suspend = next(e for e in entries if e["action"] == "suspend")
    assert (suspend["before"]["state"], suspend["after"]["state"]) == ("live", "suspended")
    assert suspend["resource_id"] == str(app["id"])

    key_created = next(
        e for e in entries if e["resource"] == "application_key" and e["action"] == "create"
    )
    assert key_created["after"] == {"application_id": app["id"], "hint": key["hint"]}

    promotions = [e for e in entries if e["action"] == "promote"]
    first_promotion = promotions[-1]
    assert first_promotion["before"] is None
    assert first_promotion["after"]["path_prefix"] == "/shop"
    assert promotions[0]["before"]["path_prefix"] == "/shop"
    assert promotions[0]["after"]["path_prefix"] == "/store"

    rollback = next(e for e in entries if e["action"] == "rollback")
    assert rollback["resource"] == "environment" and rollback["resource_id"] == "production"
    assert rollback["after"]["to"] == promoted["version"]
    assert rollback["before"]["version"] > promoted["version"]

    deleted = next(e for e in entries if e["action"] == "delete" and e["resource"] == "metric")
    assert deleted["before"]["name"] == "gone" and deleted["after"] is None

    # The bootstrap token made the subscription.
    assert {e["resource"] for e in audit(cp, actor="bootstrap", action="create")} >= {
        "account",
        "plan",
        "application",
        "token",
    }


def test_the_audit_log_is_filtered_and_paginated(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    product = make_product(cp)
    for n in range(5):
        cp.api.patch(f"/products/{product['id']}", json={"description": f"d{n}"})
    updates = audit(cp, resource="product", resource_id=str(product["id"]), action="update")
    assert [e["after"]["description"] for e in updates] == ["d4", "d3", "d2", "d1", "d0"]
    page = cp.api.get("/audit", params={"action": "update", "per_page": 2, "page": 2}).json()
    assert page["total"] == 5 and [e["after"]["description"] for e in page["items"]] == [
        "d2",
        "d1",
    ]
    assert audit(cp, resource="product", action="delete") == []
    assert audit(cp, actor="nobody") == []
    ids = [e["id"] for e in audit(cp)]
    assert ids == sorted(ids, reverse=True)
    # An update that changes nothing is not a change.
    cp.api.patch(f"/products/{product['id']}", json={"description": "d4"})
    assert len(audit(cp, resource="product", action="update")) == 5
