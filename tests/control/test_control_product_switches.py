"""The product settings hide_credentials and case_insensitive_rules go wherever a product
setting goes: the store (with their defaults for products stored before them), the admin
API, the staged snapshot, and a gateway attached to the control plane."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from control_support import (
    PROPAGATION_S,
    ControlPlane,
    attached_gateway,
    make_product,
    make_subscription,
    problem,
    start_control,
    within,
)
from harness import echo_upstream
from sqlalchemy import create_engine, text

from meshgate.control._db import Database, normalize_url


def _staged(cp: ControlPlane, name: str, has: str | None = None) -> dict[str, Any]:
    """The product ``name`` in the staging snapshot, once it is there (holding ``has``)."""

    def found(doc: dict[str, Any]) -> bool:
        products = {p["name"]: p for p in doc["products"]}
        return name in products and (has is None or has in products[name])

    doc = cp.wait_snapshot("staging", found)
    return dict(next(p for p in doc["products"] if p["name"] == name))


def test_the_switches_are_stored_shown_patched_and_staged(control: ControlPlane) -> None:
    cp = control
    name = f"sw-{uuid.uuid4().hex[:6]}"
    product = make_product(cp, name=name, path_prefix=f"/{name}")
    assert (product["hide_credentials"], product["case_insensitive_rules"]) == (True, False)
    # Defaults are left out of the snapshot, as a gateway file leaves them out.
    staged = _staged(cp, name)
    assert "hide_credentials" not in staged and "case_insensitive_rules" not in staged

    changed = cp.api.patch(
        f"/products/{product['id']}",
        json={"hide_credentials": False, "case_insensitive_rules": True},
    )
    assert changed.status_code == 200, changed.text
    shown = cp.api.get(f"/products/{product['id']}").json()
    assert (shown["hide_credentials"], shown["case_insensitive_rules"]) == (False, True)
    staged = _staged(cp, name, has="hide_credentials")
    assert (staged["hide_credentials"], staged["case_insensitive_rules"]) == (False, True)

    problem(
        cp.api.patch(f"/products/{product['id']}", json={"hide_credentials": "no"}),
        422,
        "body.hide_credentials",
    )
    other = f"sw-{uuid.uuid4().hex[:6]}"
    created = make_product(
        cp, name=other, path_prefix=f"/{other}", hide_credentials=False, case_insensitive_rules=True
    )
    assert (created["hide_credentials"], created["case_insensitive_rules"]) == (False, True)


def test_products_stored_before_the_switches_get_their_defaults(
    tmp_path: Path, database_url: str
) -> None:
    from alembic import command

    from meshgate.control._db import _alembic

    database = Database(database_url)
    with database.engine.begin() as connection:
        command.upgrade(_alembic(connection), "0002")
        connection.execute(
            text(
                "INSERT INTO products (name, description, hosts, path_prefix, strip_prefix, "
                "auth, policies, key_salt, created_at, updated_at, version) VALUES ('old', '', "
                "'[\"*\"]', '/old', true, '{\"type\": \"api_key\"}', '[]', "
                "'00112233445566778899aabbccddeeff', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
            )
        )
    database.dispose()
    cp = start_control(tmp_path, database_url)
    try:
        (old,) = cp.api.get("/products", params={"name": "old"}).json()["items"]
        assert (old["hide_credentials"], old["case_insensitive_rules"]) == (True, False)
    finally:
        cp.stop()
    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT hide_credentials, case_insensitive_rules FROM products")
            ).one()
    finally:
        engine.dispose()
    assert (bool(row[0]), bool(row[1])) == (True, False)


def test_an_attached_gateway_hides_credentials_as_the_product_says(
    control_sqlite: ControlPlane, tmp_path: Path
) -> None:
    cp = control_sqlite
    with echo_upstream(tmp_path) as upstream:
        product = make_product(cp, upstream)
        key = make_subscription(cp, product["id"])["application"]["key"]
        cp.post(f"/products/{product['id']}/promote")
        with attached_gateway(tmp_path, cp.url, cp.token) as gw:

            def forwarded_key() -> str | None:
                answer = gw.get("/echo/ADMIN", key)
                if answer.status_code != 200:
                    return "not served"
                return answer.json()["headers"].get("x-api-key")

            within(PROPAGATION_S * 5, lambda: forwarded_key() is None, "the key hidden")

            cp.api.patch(f"/products/{product['id']}", json={"hide_credentials": False})
            cp.post(f"/products/{product['id']}/promote")
            within(PROPAGATION_S, lambda: forwarded_key() == key, "the key forwarded")

            hits = cp.api.get(f"/products/{product['id']}/metrics").json()["items"][0]
            admin = cp.post(
                f"/products/{product['id']}/metrics", {"name": "admin", "parent_id": hits["id"]}
            )
            cp.post(
                f"/products/{product['id']}/mapping_rules",
                {"pattern": "/admin", "metric_id": admin["id"], "last": True, "position": 0},
            )
            plan_id = cp.api.get(f"/products/{product['id']}/plans").json()["items"][0]["id"]
            cp.post(
                f"/plans/{plan_id}/limits", {"metric_id": admin["id"], "period": "day", "value": 0}
            )
            cp.api.patch(f"/products/{product['id']}", json={"case_insensitive_rules": True})
            cp.post(f"/products/{product['id']}/promote")
            within(
                PROPAGATION_S,
                lambda: gw.get("/echo/ADMIN", key).status_code == 429,
                "/ADMIN counted by the rule on /admin",
            )
