"""The admin API refuses what a gateway file refuses: a URL, host or header name with a
control character (or a URL with a space) is a 422 naming the field, and nothing of it is
stored or staged for a gateway to write into an upstream request."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from control_support import ControlPlane, make_product, problem

INJECTED = "http://127.0.0.1:9101/a HTTP/1.1\r\nX-Injected: 1\r\nX-Pad: "
CRLF = "x\r\nX-Injected: 1"


def _name() -> str:
    return f"wire-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"backend": INJECTED}, "body.backend"),
        ({"backend": "http://127.0.0.1:9101/a b"}, "body.backend"),
        ({"hosts": [f"api.example.com{CRLF}"]}, "body.hosts[0]"),
        ({"path_prefix": f"/a{CRLF}", "strip_prefix": False}, "body.path_prefix"),
        ({"auth": {"type": "api_key", "header": f"X-Key{CRLF}"}}, "body.auth.header"),
        ({"auth": {"type": "api_key", "query": "key\r\n"}}, "body.auth.query"),
        (
            {"auth": {"type": "app_id_key", "app_key_header": "X-Key: 1"}},
            "body.auth.app_key_header",
        ),
        (
            {"auth": {"type": "jwt", "jwks_url": f"http://idp/{CRLF}"}},
            "body.auth.jwks_url",
        ),
        (
            {
                "policies": [
                    {"url_rewrite": {"commands": [{"regex": "^/", "replace": f"/a{CRLF}"}]}}
                ]
            },
            "body.policies[0].url_rewrite.commands[0]",
        ),
        (
            {"policies": [{"headers": {"request": {"set": {"X-A": f"1{CRLF}"}}}}]},
            "body.policies[0].headers.request.set",
        ),
    ],
)
def test_a_new_product_with_control_characters_is_refused(
    control_shared: ControlPlane, fields: dict[str, Any], field: str
) -> None:
    cp = control_shared
    name = _name()
    body = {"name": name, "path_prefix": f"/{name}", "auth": {"type": "api_key"}, **fields}
    problem(cp.api.post("/products", json=body), 422, field)
    assert cp.api.get("/products", params={"name": name}).json()["items"] == []


def test_changes_carrying_control_characters_are_refused_and_nothing_is_staged(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    name = _name()
    product = make_product(cp, 9101, name=name, path_prefix=f"/{name}")
    pid = product["id"]
    staged = json.dumps(cp.snapshot("staging").json())
    problem(cp.api.post(f"/products/{pid}/backends", json={"path": "/v2", "url": INJECTED}), 422)
    (backend,) = cp.api.get(f"/products/{pid}/backends").json()["items"]
    problem(cp.api.patch(f"/backends/{backend['id']}", json={"url": INJECTED}), 422, "body.url")
    problem(
        cp.api.patch(f"/products/{pid}", json={"hosts": ["a.example", f"b{CRLF}"]}),
        422,
        "body.hosts[1]",
    )
    problem(
        cp.api.patch(f"/products/{pid}", json={"auth": {"type": "jwt", "jwks_url": INJECTED}}),
        422,
        "body.auth.jwks_url",
    )
    assert [b["url"] for b in cp.api.get(f"/products/{pid}/backends").json()["items"]] == [
        "http://127.0.0.1:9101"
    ]
    assert cp.api.get(f"/products/{pid}").json()["hosts"] == ["*"]
    assert "X-Injected" not in json.dumps(cp.snapshot("staging").json())
    assert "X-Injected" not in staged


def test_a_file_applied_through_the_admin_api_is_refused_alike(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    name = _name()
    document = {
        "products": [
            {
                "name": name,
                "path_prefix": f"/{name}",
                "hosts": [f"a.example{CRLF}"],
                "backend": INJECTED,
                "auth": {"type": "api_key", "header": f"X-Key{CRLF}"},
            }
        ]
    }
    response = cp.api.post(
        "/declarative",
        content=json.dumps(document),
        params={"prune": "false"},
        headers={"Content-Type": "application/json"},
    )
    body = problem(response, 422)
    fields = {e["field"] for e in body["errors"]}
    assert fields == {
        "products[0].hosts[0]",
        "products[0].backend",
        "products[0].auth.header",
    }, body
    assert cp.api.get("/products", params={"name": name}).json()["items"] == []
