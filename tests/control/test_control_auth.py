"""Bearer tokens: required, scoped (read, write, dataplane), revocable, stored hashed."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from control_support import TOKEN, ControlPlane, dump_database, make_product, problem
from harness import raw_exchange


def _token(cp: ControlPlane, *scopes: str, **fields: object) -> dict[str, object]:
    body = {"name": f"t-{uuid.uuid4().hex[:8]}", "scopes": list(scopes), **fields}
    return dict(cp.post("/tokens", body))


def _as(cp: ControlPlane, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{cp.url}/admin/api", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def test_without_a_valid_token_every_api_is_401_with_a_challenge(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer mgt_not-a-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer " + "x" * 600},
    ):
        for method, path in (
            ("GET", "/admin/api/products"),
            ("POST", "/admin/api/accounts"),
            ("GET", "/admin/api/audit"),
            ("GET", "/dp/v1/snapshot?env=production"),
            ("POST", "/dp/v1/status"),
        ):
            response = httpx.request(
                method, f"{cp.url}{path}", headers=headers, json={"name": "x"}, timeout=10
            )
            problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer"), (headers, path)
    # Health and the API's document are public: load balancers and clients read them.
    assert httpx.get(f"{cp.url}/healthz").status_code == 200
    assert httpx.get(f"{cp.url}/admin/api/openapi.json").status_code == 200


def test_a_caller_without_a_token_learns_nothing_from_how_its_body_is_checked(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    bodies = (
        b"{not json",  # 400 for a caller with a token
        b'{"name": 5}',  # 422: a field of the wrong type
        b"x" * 1024,
    )
    for body in bodies:
        for path in ("/admin/api/accounts", "/admin/api/declarative", "/dp/v1/status"):
            response = httpx.post(
                f"{cp.url}{path}",
                content=body,
                headers={"content-type": "application/json"},
                timeout=10,
            )
            problem(response, 401)
    # Even a declared size above the limit: 401 first, not 413.
    head = (
        b"POST /admin/api/accounts HTTP/1.1\r\nhost: cp\r\ncontent-type: application/json\r\n"
        b"content-length: 1099511627776\r\n\r\n"
    )
    assert raw_exchange(cp.port, head).startswith(b"HTTP/1.1 401 ")
    # With a token, the same bodies get their own answers.
    malformed = cp.api.post(
        "/accounts", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert cp.api.post("/accounts", json={"name": 5}).status_code == 422


def test_scopes_decide_what_a_token_may_do(control_shared: ControlPlane) -> None:
    cp = control_shared
    product = make_product(cp, name=f"scoped-{uuid.uuid4().hex[:6]}", path_prefix="/scoped")
    reader = _as(cp, str(_token(cp, "read")["token"]))
    dataplane = _as(cp, str(_token(cp, "dataplane")["token"]))
    writer = _as(cp, str(_token(cp, "write")["token"]))

    assert reader.get("/products").status_code == 200
    assert reader.get(f"/products/{product['id']}").status_code == 200
    assert reader.get("/audit").status_code == 200
    for response in (
        reader.post("/accounts", json={"name": "nope"}),
        reader.patch(f"/products/{product['id']}", json={"description": "x"}),
        reader.delete(f"/products/{product['id']}"),
        reader.post(f"/products/{product['id']}/promote"),
        reader.post("/tokens", json={"name": "escalate", "scopes": ["write"]}),
        reader.get("/tokens"),
    ):
        assert "'write' scope" in problem(response, 403)["detail"]
    snapshot = httpx.get(
        f"{cp.url}/dp/v1/snapshot",
        params={"env": "production"},
        headers={"Authorization": reader.headers["Authorization"]},
    )
    problem(snapshot, 403)

    for response in (
        dataplane.get("/products"),
        dataplane.get("/dataplanes"),
        dataplane.post("/accounts", json={"name": "nope"}),
    ):
        problem(response, 403)
    pulled = httpx.get(
        f"{cp.url}/dp/v1/snapshot",
        params={"env": "production"},
        headers={"Authorization": dataplane.headers["Authorization"]},
    )
    assert pulled.status_code == 200 and "products" in pulled.json()
    status = httpx.post(
        f"{cp.url}/dp/v1/status",
        json={"id": "gw-scoped", "env": "production", "version": "1"},
        headers={"Authorization": dataplane.headers["Authorization"]},
    )
    assert status.status_code == 204

    # write without read: changes, but cannot read back.
    assert writer.post("/accounts", json={"name": f"w-{uuid.uuid4().hex[:6]}"}).status_code == 201
    problem(writer.get("/accounts"), 403)
    assert cp.api.get("/accounts", params={"name": "nope"}).json()["total"] == 0


def test_a_deleted_or_expired_token_stops_working(control_shared: ControlPlane) -> None:
    cp = control_shared
    token = _token(cp, "read", "write")
    client = _as(cp, str(token["token"]))
    assert client.get("/products").status_code == 200
    assert cp.api.delete(f"/tokens/{token['id']}").status_code == 204
    problem(client.get("/products"), 401)

    soon = datetime.now(UTC) + timedelta(seconds=2)
    expiring = _as(cp, str(_token(cp, "read", expires_at=soon.isoformat())["token"]))
    assert expiring.get("/products").status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.2)
    problem(expiring.get("/products"), 401)

    # An expiry given with an offset is the same instant in UTC.
    offset = _token(cp, "read", expires_at="2031-06-01T12:00:00+02:00")
    listed = {t["id"]: t for t in cp.api.get("/tokens").json()}
    assert listed[offset["id"]]["expires_at"] == "2031-06-01T10:00:00Z"


def test_tokens_are_stored_only_as_hashes(control: ControlPlane) -> None:
    cp = control
    made = _token(cp, "read")
    assert _as(cp, str(made["token"])).get("/accounts").status_code == 200
    rows = dump_database(cp.database_url)["admin_tokens"]
    stored = {row["name"]: row for row in rows}
    for name, clear in ((made["name"], made["token"]), ("bootstrap", TOKEN)):
        row = stored[name]
        assert row["token_hash"] == hashlib.sha256(str(clear).encode()).hexdigest()
        assert str(clear) not in repr(row)
    # The token is in no other column of any table either.
    text = repr(dump_database(cp.database_url))
    assert str(made["token"]) not in text and TOKEN not in text
