"""Applications: states and their transitions, plans that need approval, keys per auth mode."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from control_support import ControlPlane, make_product, problem


def _setup(cp: ControlPlane, **product: Any) -> dict[str, Any]:
    name = f"apps-{uuid.uuid4().hex[:8]}"
    made = make_product(cp, name=name, path_prefix=f"/{name}", **product)
    account = cp.post("/accounts", {"name": f"{name}-dev"})
    return {"product": made, "account": account}


def _app(cp: ControlPlane, setup: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    return dict(
        cp.post(
            "/applications",
            {"account_id": setup["account"]["id"], "plan_id": plan["id"], "name": "app"},
        )
    )


def test_transitions_go_only_where_they_may(control_shared: ControlPlane) -> None:
    cp = control_shared
    setup = _setup(cp)
    product_id = setup["product"]["id"]
    approval = cp.post(
        f"/products/{product_id}/plans", {"name": "vetted", "approval_required": True}
    )
    app = _app(cp, setup, approval)
    assert app["state"] == "pending"
    path = f"/applications/{app['id']}"

    assert "cannot be resumed" in problem(cp.api.post(f"{path}/resume"), 409)["detail"]
    accepted = cp.api.post(f"{path}/accept")
    assert accepted.status_code == 200 and accepted.json()["state"] == "live"
    # Asking for the state it is in changes nothing.
    for action in ("accept", "resume"):
        same = cp.api.post(f"{path}/{action}")
        assert same.status_code == 200 and same.json()["version"] == accepted.json()["version"]
    assert cp.api.post(f"{path}/suspend").json()["state"] == "suspended"
    assert cp.api.post(f"{path}/suspend").json()["state"] == "suspended"
    assert "cannot be accepted" in problem(cp.api.post(f"{path}/accept"), 409)["detail"]
    assert cp.api.post(f"{path}/resume").json()["state"] == "live"
    for action in ("suspend", "resume", "accept"):
        problem(cp.api.post(f"/applications/2147483647/{action}"), 404)


def test_a_plan_change_stays_within_the_product(control_shared: ControlPlane) -> None:
    cp = control_shared
    setup = _setup(cp)
    product_id = setup["product"]["id"]
    basic = cp.post(f"/products/{product_id}/plans", {"name": "basic"})
    gold = cp.post(f"/products/{product_id}/plans", {"name": "gold", "trial_days": 14})
    app = _app(cp, setup, basic)
    assert app["trial_ends_at"] is None
    moved = cp.api.post(f"/applications/{app['id']}/change_plan", json={"plan_id": gold["id"]})
    assert moved.status_code == 200 and moved.json()["plan_id"] == gold["id"]
    assert cp.api.get("/applications", params={"plan_id": gold["id"]}).json()["total"] == 1

    trial = _app(cp, setup, gold)
    ends = datetime.fromisoformat(trial["trial_ends_at"])
    assert abs(ends - (datetime.now(UTC) + timedelta(days=14))) < timedelta(minutes=1)
    problem(
        cp.api.post(f"/applications/{app['id']}/change_plan", json={"plan_id": 2147483647}),
        422,
        "body.plan_id",
    )


def test_keys_follow_the_products_auth_mode(control_shared: ControlPlane) -> None:
    cp = control_shared
    keyed = _setup(cp)
    plan = cp.post(f"/products/{keyed['product']['id']}/plans", {"name": "p"})
    app = _app(cp, keyed, plan)
    for _ in range(4):
        cp.post(f"/applications/{app['id']}/keys", {})
    assert len(cp.api.get(f"/applications/{app['id']}/keys").json()) == 5
    assert (
        "at most 5 keys"
        in problem(cp.api.post(f"/applications/{app['id']}/keys", json={}), 409)["detail"]
    )

    jwt = _setup(cp, auth={"type": "jwt", "keys": [{"secret": "s3cret"}], "algorithms": ["HS256"]})
    plan = cp.post(f"/products/{jwt['product']['id']}/plans", {"name": "p"})
    tokens_only = _app(cp, jwt, plan)
    assert tokens_only["key"] is None
    assert cp.api.get(f"/applications/{tokens_only['id']}/keys").json() == []
    assert (
        "no keys"
        in problem(cp.api.post(f"/applications/{tokens_only['id']}/keys", json={}), 409)["detail"]
    )


def test_an_application_id_of_ones_own_is_kept(control_shared: ControlPlane) -> None:
    cp = control_shared
    setup = _setup(cp, auth={"type": "app_id_key"})
    plan = cp.post(f"/products/{setup['product']['id']}/plans", {"name": "p"})
    app_id = f"mobile-{uuid.uuid4().hex[:6]}"
    app = cp.post(
        "/applications",
        {
            "account_id": setup["account"]["id"],
            "plan_id": plan["id"],
            "name": "m",
            "app_id": app_id,
        },
    )
    assert app["app_id"] == app_id and app["key"]
    assert cp.api.get(f"/applications/{app['id']}").json()["app_id"] == app_id
