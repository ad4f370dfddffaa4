"""Keys and admin tokens are never kept in clear: not in any table, any snapshot of any
environment, or the control plane's log; the gateway gets salted hashes it can check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from control_support import TOKEN, ControlPlane, dump_database, make_product, start_control

from meshgate.config import hash_key


@pytest.fixture
def control_debug(tmp_path: Path, database_url: str) -> Iterator[ControlPlane]:
    """A control plane on each store, logging everything it logs (DEBUG)."""
    cp = start_control(tmp_path, database_url, None, "--log-level", "DEBUG")
    yield cp
    cp.stop()


def test_clear_keys_and_tokens_appear_nowhere(control_debug: ControlPlane) -> None:
    cp = control_debug
    keyed = make_product(cp, name="keyed", path_prefix="/keyed")
    paired = make_product(cp, name="paired", path_prefix="/paired", auth={"type": "app_id_key"})
    account = cp.post("/accounts", {"name": "acme"})
    clear: dict[str, str] = {}  # key -> the application's public id
    apps = []
    for product in (keyed, paired):
        plan = cp.post(f"/products/{product['id']}/plans", {"name": "p"})
        for n in range(2):
            app = cp.post(
                "/applications",
                {"account_id": account["id"], "plan_id": plan["id"], "name": f"a{n}"},
            )
            apps.append((product, app))
            clear[app["key"]] = app["app_id"]
            own = cp.post(
                f"/applications/{app['id']}/keys", {"key": f"own-key-{product['name']}-{n}-xyz"}
            )
            clear[own["key"]] = app["app_id"]
            clear[cp.post(f"/applications/{app['id']}/keys", {})["key"]] = app["app_id"]
        # A refused key (already used) goes through the error paths too.
        dup = cp.api.post(f"/applications/{apps[-1][1]['id']}/keys", json={"key": own["key"]})
        assert dup.status_code == 409
    tokens = [cp.post("/tokens", {"name": f"t{n}", "scopes": ["read"]})["token"] for n in range(3)]
    secrets = [*clear, *tokens, TOKEN]
    for product, _ in apps[::2]:
        cp.post(f"/products/{product['id']}/promote")

    staged = cp.wait_snapshot(
        "staging",
        lambda d: (
            sum(len(a.get("key_hashes", [])) for p in d["products"] for a in p["applications"])
            == len(clear)
        ),
    )
    production = cp.wait_snapshot(
        "production",
        lambda d: (
            sum(len(a.get("key_hashes", [])) for p in d["products"] for a in p["applications"])
            == len(clear)
        ),
    )
    assert staged["products"] and production["products"]

    # Every version of each environment, as stored and as served.
    documents = []
    for env in ("staging", "production"):
        versions = cp.api.get(f"/environments/{env}/snapshots", params={"per_page": 500}).json()
        for item in versions["items"]:
            documents.append(cp.api.get(f"/environments/{env}/snapshots/{item['version']}").text)
        documents.append(cp.snapshot(env).text)
    database = repr(dump_database(cp.database_url))
    audit_log = cp.api.get("/audit", params={"per_page": 500}).text
    cp.stop()
    log = cp.log()
    assert "DEBUG" in log or "INFO" in log
    for secret in secrets:
        assert secret not in database, "a secret is in the database"
        assert secret not in log, "a secret is in the log"
        assert secret not in audit_log, "a secret is in the audit log"
        for document in documents:
            assert secret not in document, "a secret is in a snapshot"

    # The snapshot carries what a gateway needs to check a key: the salted hash.
    salts = {p["name"]: p["key_salt"] for p in production["products"]}
    by_app = {
        a["id"]: (p["name"], set(a["key_hashes"]))
        for p in production["products"]
        for a in p["applications"]
    }
    for key, app_id in clear.items():
        product_name, hashes = by_app[app_id]
        assert hash_key(salts[product_name], key) in hashes
    stored = dump_database(cp.database_url)
    assert {r["key_hash"] for r in stored["application_keys"]} == {
        h for _, hashes in by_app.values() for h in hashes
    }
    assert {r["name"]: r["key_salt"] for r in stored["products"]} == salts
