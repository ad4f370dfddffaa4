"""Keys distributed as salted hashes (key_hashes + the product's key_salt): the gateway hashes
what it receives and compares; the key itself never shows up in logs or answers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from harness import echo_upstream, example_product, gateway_config, run_gateway

from meshgate.config import Product, hash_key, new_key, new_salt
from meshgate.gateway.credentials import Authenticator, AuthError
from meshgate.proxy import Headers, Request

SALT = new_salt()
HASHED = new_key()
UNICODE = "clé-ünïcode-key"
TIMEOUT = 20.0


def product(auth: dict[str, Any], apps: list[dict[str, Any]], salt: str | None = SALT) -> Product:
    return Product.model_validate(
        {
            "name": "shop",
            "backend": "http://127.0.0.1:9001",
            "auth": auth,
            "plans": [{"name": "basic"}],
            "applications": apps,
            "key_salt": salt,
        }
    )


def request(headers: dict[str, str] | None = None, query: str = "") -> Request:
    raw = Headers((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    return Request("GET", b"/", "/", query, raw)


def status_of(auth: Authenticator, req: Request) -> int | str:
    try:
        app = auth.authenticate_nowait(req)
    except AuthError as exc:
        return exc.status
    assert app is not None
    return app.id


API_KEY_APPS = [
    {"id": "hashed", "plan": "basic", "key_hashes": [hash_key(SALT, HASHED)]},
    {"id": "plain", "plan": "basic", "keys": ["plain-key"]},
    {"id": "both", "plan": "basic", "keys": ["both-plain"], "key_hashes": [hash_key(SALT, "b2")]},
    {"id": "uni", "plan": "basic", "key_hashes": [hash_key(SALT, UNICODE)]},
    {"id": "held", "plan": "basic", "state": "pending", "key_hashes": [hash_key(SALT, "p1")]},
    {"id": "off", "plan": "basic", "state": "suspended", "key_hashes": [hash_key(SALT, "s1")]},
]


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"X-API-Key": HASHED}, "", "hashed"),
        ({}, f"user_key={HASHED}", "hashed"),
        ({"X-API-Key": "plain-key"}, "", "plain"),
        ({"X-API-Key": "both-plain"}, "", "both"),
        ({"X-API-Key": "b2"}, "", "both"),
        ({}, f"user_key={quote(UNICODE)}", "uni"),
        ({"X-API-Key": "p1"}, "", 403),
        ({"X-API-Key": "s1"}, "", 403),
        ({"X-API-Key": HASHED + "x"}, "", 403),
        # The hash itself is not a key.
        ({"X-API-Key": hash_key(SALT, HASHED)}, "", 403),
        ({}, "", 401),
    ],
)
def test_api_key_accepts_hashed_and_plain_keys(
    headers: dict[str, str], query: str, expected: int | str
) -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}, API_KEY_APPS))
    assert status_of(auth, request(headers, query)) == expected
    # Twice: a key found once is remembered, and still admitted or refused the same way.
    assert status_of(auth, request(headers, query)) == expected


def test_a_utf8_key_in_a_header_is_hashed_as_sent() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}, API_KEY_APPS))
    raw = Headers([(b"x-api-key", UNICODE.encode())])
    assert status_of(auth, Request("GET", b"/", "/", "", raw)) == "uni"


def test_another_salt_does_not_match() -> None:
    other = product({"type": "api_key"}, API_KEY_APPS, salt=new_salt())
    auth = Authenticator.for_product(other)
    assert status_of(auth, request({"X-API-Key": HASHED})) == 403
    assert status_of(auth, request({"X-API-Key": "plain-key"})) == "plain"


APP_ID_APPS = [
    {"id": "a1", "plan": "basic", "key_hashes": [hash_key(SALT, "secret-1")]},
    {"id": "a2", "plan": "basic", "keys": ["plain-2"], "key_hashes": [hash_key(SALT, "hashed-2")]},
    {"id": "a3", "plan": "basic"},
    {"id": "a4", "plan": "basic", "state": "pending", "key_hashes": [hash_key(SALT, "k4")]},
]


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"X-App-Id": "a1", "X-App-Key": "secret-1"}, "", "a1"),
        ({}, "app_id=a1&app_key=secret-1", "a1"),
        ({"X-App-Id": "a1", "X-App-Key": "hashed-2"}, "", 403),
        ({"X-App-Id": "a2", "X-App-Key": "hashed-2"}, "", "a2"),
        ({"X-App-Id": "a2", "X-App-Key": "plain-2"}, "", "a2"),
        ({"X-App-Id": "a1"}, "", 401),
        ({"X-App-Id": "a3"}, "", "a3"),
        ({"X-App-Id": "a4", "X-App-Key": "k4"}, "", 403),
        ({"X-App-Id": "nobody", "X-App-Key": "secret-1"}, "", 403),
    ],
)
def test_app_id_key_accepts_hashed_keys(
    headers: dict[str, str], query: str, expected: int | str
) -> None:
    auth = Authenticator.for_product(product({"type": "app_id_key"}, APP_ID_APPS))
    assert status_of(auth, request(headers, query)) == expected


def test_hashed_keys_end_to_end_and_never_in_clear(tmp_path: Path) -> None:
    secret = new_key()
    wrong = new_key()
    apps = [
        {"id": "app1", "plan": "basic", "key_hashes": [hash_key(SALT, secret)]},
        {"id": "app2", "plan": "basic", "keys": ["k2"]},
    ]
    with echo_upstream(tmp_path) as upstream:
        keyed = example_product(upstream, applications=apps, key_salt=SALT)
        keyed["auth"] = {"type": "api_key"}  # the X-API-Key header or the user_key parameter
        config = gateway_config([keyed])
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            ok = client.get("/echo/hello", headers={"X-API-Key": secret})
            assert ok.status_code == 200
            assert client.get("/echo/hello", headers={"X-API-Key": "k2"}).status_code == 200
            refused = client.get("/echo/hello", headers={"X-API-Key": wrong})
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"
            assert wrong not in refused.text
            in_query = client.get("/echo/hello", params={"user_key": wrong})
            assert in_query.status_code == 403 and wrong not in in_query.text
            usage = client.get(f"{gw.admin_url}/usage/app1").json()
            assert usage["application"] == "app1"
            deadline = time.monotonic() + TIMEOUT
            while len(entries := gw.access_log()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [e["application"] for e in entries[:2]] == ["app1", "app2"]
            assert [e["status"] for e in entries[:4]] == [200, 200, 403, 403]
            by_query = client.get("/echo/hello", params={"user_key": secret})
            assert by_query.status_code == 200
            by_query = client.get("/echo/hello", params={"user_key": secret})
            assert by_query.status_code == 200
        logs = gw.proc.stdout() + gw.proc.stderr()
        assert secret not in logs and wrong not in logs
