"""Snapshots per environment: staging follows every change, production follows promotion and
rollback; gateways pull them with ETags and long polls and report what they run."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
from control_support import TOKEN, ControlPlane, full_product, make_product, problem

# "Staging gets every change within about a second", with room for a loaded machine.
WITHIN = 1.5


def _products(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in doc["products"]}


def _timed_snapshot(cp: ControlPlane, env: str, predicate: Any, within: float) -> dict[str, Any]:
    started = time.monotonic()
    doc = cp.wait_snapshot(env, predicate, timeout=within)
    assert time.monotonic() - started < within
    return doc


def test_staging_follows_every_change_and_production_only_promotion(
    control: ControlPlane,
) -> None:
    cp = control
    ids = full_product(cp, "shop")
    product_id = ids["product"]["id"]
    staged = _timed_snapshot(
        cp,
        "staging",
        lambda d: "shop" in _products(d) and _products(d)["shop"]["applications"],
        WITHIN,
    )
    shop = _products(staged)["shop"]
    assert shop["path_prefix"] == "/shop"
    assert [m["name"] for m in shop["metrics"]] == ["hits", "search"]
    # The product's own catch-all rule comes first (created with it, at position 0).
    assert [r["pattern"] for r in shop["mapping_rules"]] == ["/", "/search"]
    assert shop["mapping_rules"][1] == {
        "method": "GET",
        "pattern": "/search",
        "metric": "search",
        "increment": 1,
        "last": True,
    }
    assert shop["plans"] == [
        {"name": "basic", "limits": [{"metric": "hits", "period": "minute", "value": 5}]}
    ]
    assert [a["id"] for a in shop["applications"]] == [ids["application"]["app_id"]]
    # Named with its account: what the gateway's consumer token tells the mesh.
    assert (shop["applications"][0]["name"], shop["applications"][0]["account"]) == (
        "app",
        "shop-dev",
    )
    assert cp.snapshot("production").json()["products"] == []

    cp.api.patch(f"/products/{product_id}", json={"path_prefix": "/v2/shop"})
    _timed_snapshot(
        cp, "staging", lambda d: _products(d)["shop"]["path_prefix"] == "/v2/shop", WITHIN
    )
    assert cp.snapshot("production").json()["products"] == []

    promoted = cp.post(f"/products/{product_id}/promote")
    assert promoted["changed"] is True and promoted["env"] == "production"
    production = cp.snapshot("production")
    assert production.headers["x-meshgate-version"] == str(promoted["version"])
    assert _products(production.json())["shop"]["path_prefix"] == "/v2/shop"
    again = cp.post(f"/products/{product_id}/promote")
    assert again["changed"] is False and again["version"] == promoted["version"]

    # Configuration waits for promotion; live data (applications, plans) does not.
    cp.api.patch(f"/products/{product_id}", json={"path_prefix": "/v3/shop"})
    account = cp.post("/accounts", {"name": "late"})
    late = cp.post(
        "/applications",
        {"account_id": account["id"], "plan_id": ids["plan"]["id"], "name": "late"},
    )
    live = _timed_snapshot(
        cp,
        "production",
        lambda d: late["app_id"] in [a["id"] for a in _products(d)["shop"]["applications"]],
        WITHIN,
    )
    assert _products(live)["shop"]["path_prefix"] == "/v2/shop"
    cp.post(f"/applications/{late['id']}/suspend")
    suspended = _timed_snapshot(
        cp,
        "production",
        lambda d: (
            {a["id"]: a.get("state", "live") for a in _products(d)["shop"]["applications"]}[
                late["app_id"]
            ]
            == "suspended"
        ),
        WITHIN,
    )
    assert _products(suspended)["shop"]["path_prefix"] == "/v2/shop"


def test_a_product_without_a_backend_is_staged_but_left_out_with_a_reason(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    product = cp.post("/products", {"name": "bare", "auth": {"type": "api_key"}})
    time.sleep(0.3)
    assert "bare" not in _products(cp.snapshot("staging").json())
    [staging, _] = cp.api.get("/environments").json()
    assert staging["name"] == "staging" and staging["products"] == ["bare"]
    assert any("bare" in error and "backend" in error for error in staging["errors"])
    cp.post(f"/products/{product['id']}/backends", {"url": "http://127.0.0.1:9"})
    cp.wait_snapshot("staging", lambda d: "bare" in _products(d), timeout=WITHIN)
    assert cp.api.get("/environments").json()[0]["errors"] == []


def test_deleting_a_product_removes_it_from_every_environment(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    product = make_product(cp)
    cp.post(f"/products/{product['id']}/promote")
    assert "echo" in _products(cp.snapshot("production").json())
    assert cp.api.delete(f"/products/{product['id']}").status_code == 204
    cp.wait_snapshot("staging", lambda d: d["products"] == [], timeout=WITHIN)
    cp.wait_snapshot("production", lambda d: d["products"] == [], timeout=WITHIN)


def test_a_suspended_account_has_its_applications_refused(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    ids = full_product(cp, "acct")
    app_id = ids["application"]["app_id"]

    def state(doc: dict[str, Any]) -> str:
        apps = {a["id"]: a for a in _products(doc).get("acct", {}).get("applications", ())}
        return str(apps[app_id].get("state", "live")) if app_id in apps else "absent"

    cp.wait_snapshot("staging", lambda d: state(d) == "live")
    cp.api.patch(f"/accounts/{ids['account']['id']}", json={"state": "suspended"})
    cp.wait_snapshot("staging", lambda d: state(d) == "suspended", timeout=WITHIN)
    cp.api.patch(f"/accounts/{ids['account']['id']}", json={"state": "approved"})
    cp.wait_snapshot("staging", lambda d: state(d) == "live", timeout=WITHIN)


def test_rollback_returns_the_configuration_and_keeps_live_data_current(
    control: ControlPlane,
) -> None:
    cp = control
    ids = full_product(cp, "shop")
    product_id = ids["product"]["id"]
    v1 = cp.post(f"/products/{product_id}/promote")["version"]
    cp.api.patch(f"/products/{product_id}", json={"path_prefix": "/new"})
    cp.post(f"/products/{product_id}/metrics", {"name": "extra"})
    v2 = cp.post(f"/products/{product_id}/promote")["version"]
    assert v2 > v1
    # Live data changes after v1: a new application with a key, and a plan change.
    account = cp.post("/accounts", {"name": "later"})
    later = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": ids["plan"]["id"], "name": "l"}
    )
    cp.wait_snapshot(
        "production",
        lambda d: later["app_id"] in [a["id"] for a in _products(d)["shop"]["applications"]],
    )
    before = cp.snapshot("production").json()

    rolled = cp.post("/environments/production/rollback", params={"to": v1})
    assert rolled["changed"] is True and rolled["version"] > int(before["version"])
    assert rolled["skipped"] == []
    after = cp.snapshot("production").json()
    shop = _products(after)["shop"]
    old = _products(cp.api.get(f"/environments/production/snapshots/{v1}").json())["shop"]
    assert shop["path_prefix"] == "/shop" == old["path_prefix"]
    assert [m["name"] for m in shop["metrics"]] == [m["name"] for m in old["metrics"]]
    # Applications and keys are current, not v1's.
    assert [a["id"] for a in shop["applications"]] == [
        a["id"] for a in _products(before)["shop"]["applications"]
    ]
    assert later["app_id"] in [a["id"] for a in shop["applications"]]
    # Staging still has the latest configuration; the rollback did not touch it.
    assert _products(cp.snapshot("staging").json())["shop"]["path_prefix"] == "/new"

    problem(cp.api.post("/environments/production/rollback", params={"to": 999}), 404, "query.to")
    problem(cp.api.post("/environments/qa/rollback", params={"to": 1}), 422, "path.env")


def test_rollback_finds_a_renamed_product_and_skips_a_deleted_one(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    shop = make_product(cp, name="shop", path_prefix="/shop")
    gone = make_product(cp, name="gone", path_prefix="/gone")
    for product in (shop, gone):
        cp.post(f"/products/{product['id']}/promote")
    v1 = cp.api.get("/environments").json()[1]["version"]
    cp.api.patch(f"/products/{shop['id']}", json={"name": "store", "path_prefix": "/store"})
    cp.post(f"/products/{shop['id']}/promote")
    assert cp.api.delete(f"/products/{gone['id']}").status_code == 204
    # A new product under the deleted one's name is another product: v1's "gone" is not it.
    make_product(cp, name="gone", path_prefix="/new-gone")

    rolled = cp.post("/environments/production/rollback", params={"to": v1})
    assert rolled["skipped"] == ["gone"]
    production = _products(cp.snapshot("production").json())
    assert set(production) == {"shop"}
    assert production["shop"]["path_prefix"] == "/shop"
    # It is the same product: promoting it again brings its current configuration back.
    cp.post(f"/products/{shop['id']}/promote")
    assert set(_products(cp.snapshot("production").json())) == {"store"}


def test_every_version_is_listed_and_readable(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    product = make_product(cp)
    for n in range(4):
        cp.api.patch(f"/products/{product['id']}", json={"hosts": [f"h{n}.example"]})
        cp.wait_snapshot(
            "staging", lambda d, n=n: _products(d).get("echo", {}).get("hosts") == [f"h{n}.example"]
        )
    listed = cp.api.get("/environments/staging/snapshots").json()
    versions = [s["version"] for s in listed["items"]]
    assert versions == sorted(versions, reverse=True) == list(range(listed["total"], 0, -1))
    assert listed["total"] >= 5
    for item in listed["items"]:
        read = cp.api.get(f"/environments/staging/snapshots/{item['version']}")
        assert read.status_code == 200 and read.headers["content-type"] == "application/json"
        assert read.json()["version"] == str(item["version"])
        assert len(read.content) == item["size"]
    hosts = [
        _products(cp.api.get(f"/environments/staging/snapshots/{v}").json())
        .get("echo", {})
        .get("hosts")
        for v in versions[:4]
    ]
    assert hosts == [["h3.example"], ["h2.example"], ["h1.example"], ["h0.example"]]
    paged = cp.api.get("/environments/staging/snapshots", params={"per_page": 2, "page": 2}).json()
    assert [s["version"] for s in paged["items"]] == versions[2:4]
    problem(cp.api.get("/environments/staging/snapshots/999"), 404)
    environments = {e["name"]: e for e in cp.api.get("/environments").json()}
    assert environments["staging"]["version"] == versions[0]
    assert environments["production"]["products"] == []


def _pull(cp: ControlPlane, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    headers.update(params.pop("headers", {}))
    return httpx.get(
        f"{cp.url}/dp/v1/snapshot",
        params={"env": "staging", **params},
        headers=headers,
        timeout=90,
    )


def test_the_snapshot_is_cached_by_etag_and_long_polled(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    first = _pull(cp)
    assert first.status_code == 200
    tag = first.headers["etag"]
    assert first.headers["x-meshgate-version"] == first.json()["version"]

    unchanged = _pull(cp, headers={"If-None-Match": tag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == tag
    assert _pull(cp, headers={"If-None-Match": '"other"'}).status_code == 200

    # Nothing changes: the long poll holds for the wait, then says 304.
    started = time.monotonic()
    held = _pull(cp, wait=1.5, headers={"If-None-Match": tag})
    elapsed = time.monotonic() - started
    assert held.status_code == 304 and 1.4 <= elapsed < 5.0

    # A change lands while it waits: it answers at once with the new version.
    def change() -> None:
        time.sleep(0.5)
        make_product(cp)

    changer = threading.Thread(target=change)
    started = time.monotonic()
    changer.start()
    woken = _pull(cp, wait=30, headers={"If-None-Match": tag})
    elapsed = time.monotonic() - started
    changer.join()
    assert woken.status_code == 200 and woken.headers["etag"] != tag
    assert "echo" in _products(woken.json())
    # Well before the 30 s wait: woken by the change, not by the clock.
    assert elapsed < 10.0, elapsed

    for params, field in (
        ({"env": "qa"}, "query.env"),
        ({"wait": -1}, "query.wait"),
        ({"wait": 61}, "query.wait"),
        ({"wait": "soon"}, "query.wait"),
    ):
        problem(_pull(cp, **params), 422, field)
    problem(
        _pull(cp, headers={"X-Meshgate-Dataplane": "bad id"}), 422, "header.x-meshgate-dataplane"
    )


def test_dataplanes_report_status_and_are_listed(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def report(**body: Any) -> httpx.Response:
        return httpx.post(f"{cp.url}/dp/v1/status", json=body, headers=headers, timeout=10)

    assert (
        report(
            id="gw-1", env="production", version="3", hostname="edge-1", listen=":8080", pid=42
        ).status_code
        == 204
    )
    assert (
        report(id="gw-2", env="staging", version="2", error="mapping rule refused").status_code
        == 204
    )
    # A gateway that only pulls is recorded by its header, with no version yet.
    assert _pull(cp, headers={"X-Meshgate-Dataplane": "gw-3"}).status_code == 200

    listed = {d["id"]: d for d in cp.api.get("/dataplanes").json()}
    assert set(listed) == {"gw-1", "gw-2", "gw-3"}
    one = listed["gw-1"]
    assert (one["env"], one["version"], one["error"], one["hostname"], one["pid"]) == (
        "production",
        "3",
        None,
        "edge-1",
        42,
    )
    assert one["connected"] is True and one["last_seen"] >= one["first_seen"]
    assert listed["gw-2"]["error"] == "mapping rule refused"
    assert listed["gw-3"]["version"] is None and listed["gw-3"]["env"] == "staging"
    assert [d["id"] for d in cp.api.get("/dataplanes", params={"env": "staging"}).json()] == [
        "gw-2",
        "gw-3",
    ]

    # A later report replaces the version and clears the error.
    time.sleep(1.1)
    assert report(id="gw-2", env="staging", version="4").status_code == 204
    again = {d["id"]: d for d in cp.api.get("/dataplanes").json()}["gw-2"]
    assert (again["version"], again["error"]) == ("4", None)
    assert again["last_seen"] > listed["gw-2"]["last_seen"]
    assert again["first_seen"] == listed["gw-2"]["first_seen"]

    problem(report(id="gw 4", env="production"), 422, "body.id")
    problem(report(id="gw-4", env="qa"), 422, "body.env")
    problem(report(id="gw-4", env="production", pid=-1), 422, "body.pid")
    problem(cp.api.get("/dataplanes", params={"env": "qa"}), 422, "query.env")
