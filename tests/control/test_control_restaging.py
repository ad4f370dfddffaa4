"""A change a gateway could not run is refused (422 naming the field), and staging keeps
what it had: the store, the staged configuration and the snapshot are unchanged."""

from __future__ import annotations

import time
from typing import Any

import httpx
from control_support import ControlPlane, dump_database, full_product, problem


def _staging(cp: ControlPlane) -> tuple[str, dict[str, Any]]:
    response = cp.snapshot("staging")
    return response.headers["etag"], response.json()


def _settled(cp: ControlPlane) -> tuple[str, dict[str, Any]]:
    """The staging snapshot once the background compile has caught up."""
    for _ in range(100):
        if not httpx.get(f"{cp.url}/healthz").json()["pending"]:
            time.sleep(0.1)
            if not httpx.get(f"{cp.url}/healthz").json()["pending"]:
                return _staging(cp)
        time.sleep(0.05)
    raise AssertionError("the control plane never settled")


def _refused_without_trace(
    cp: ControlPlane, response: httpx.Response, field: str, before: tuple[Any, ...]
) -> None:
    problem(response, 422, field)
    time.sleep(0.3)  # a compile the change might have scheduled would land by now
    tag, doc = _staging(cp)
    rows = dump_database(cp.database_url)
    rows.pop("admin_tokens")
    assert (tag, doc, rows) == before


def test_a_change_a_gateway_could_not_run_is_refused_and_staging_kept(
    control: ControlPlane,
) -> None:
    cp = control
    ids = full_product(cp, "shop")
    product_id = ids["product"]["id"]
    tag, doc = _settled(cp)
    assert [p["name"] for p in doc["products"]] == ["shop"]
    rows = dump_database(cp.database_url)
    rows.pop("admin_tokens")
    before = (tag, doc, rows)

    for method, path, body, field in (
        ("patch", f"/products/{product_id}", {"path_prefix": "shop"}, "body.path_prefix"),
        ("patch", f"/products/{product_id}", {"path_prefix": "/a//b"}, "body.path_prefix"),
        ("post", f"/products/{product_id}/backends", {"path": "/x", "url": "h:9"}, "body.url"),
        (
            "patch",
            f"/backends/{_backend(cp, product_id)}",
            {"url": "ftp://secure.example"},
            "body.url",
        ),
        (
            "post",
            f"/products/{product_id}/mapping_rules",
            {"pattern": "search", "metric_id": ids["hits"]["id"]},
            "body.pattern",
        ),
        ("patch", f"/mapping_rules/{ids['rule']['id']}", {"pattern": "*"}, "body.pattern"),
        ("patch", f"/metrics/{ids['hits']['id']}", {"name": "requests"}, "body.name"),
    ):
        _refused_without_trace(cp, cp.api.request(method, path, json=body), field, before)


def _backend(cp: ControlPlane, product_id: int) -> int:
    return int(cp.api.get(f"/products/{product_id}/backends").json()["items"][0]["id"])


def test_a_policy_a_gateway_would_refuse_is_refused_naming_it(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    ids = full_product(cp, "shop")
    product_id = ids["product"]["id"]
    good = [{"cors": {"allow_origins": ["https://app.example.com"]}}]
    assert cp.api.patch(f"/products/{product_id}", json={"policies": good}).status_code == 200
    tag, doc = _settled(cp)
    assert doc["products"][0]["policies"] == good
    rows = dump_database(cp.database_url)
    rows.pop("admin_tokens")
    before = (tag, doc, rows)

    for policies, field in (
        (
            [{"cors": {"allow_origins": "https://app.example.com"}}],
            "body.policies[0].cors.allow_origins",
        ),
        ([{"cors": {"allow_origins": ["not an origin"]}}], "body.policies[0].cors.allow_origins"),
        ([{"cors": {"colour": "red"}}], "body.policies[0].cors.colour"),
        ([{"no_such_policy": {}}], "body.policies[0]"),
    ):
        response = cp.api.patch(f"/products/{product_id}", json={"policies": policies})
        _refused_without_trace(cp, response, field, before)
    created = cp.api.post(
        "/products",
        json={"name": "other", "auth": {"type": "api_key"}, "policies": [{"nope": {}}]},
    )
    _refused_without_trace(cp, created, "body.policies[0]", before)
