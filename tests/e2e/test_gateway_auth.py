"""The auth modes end to end: api_key by query, app_id_key, and JWT against a real JWKS URL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from gateway_e2e_support import TIMEOUT, values
from harness import echo_upstream, example_product, free_port, gateway_config, run_gateway
from jwt.algorithms import RSAAlgorithm

ETERNAL = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 3}]}]


def test_api_key_in_the_query(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(upstream, auth={"type": "api_key", "query": "user_key"})
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            ok = client.get("/echo/hello?user_key=k1&x=1")
            assert ok.status_code == 200
            assert ok.json()["query"] == "x=1"  # hide_credentials: the key stays here
            assert client.get("/echo/hello?user_key=nope").status_code == 403
            # Only the query was configured: the default header does not count.
            missing = client.get("/echo/hello", headers={"X-API-Key": "k1"})
            assert missing.status_code == 401
            assert "user_key" in missing.json()["detail"]


def test_app_id_and_key(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            auth={"type": "app_id_key"},
            plans=ETERNAL,
            applications=[
                {"id": "app1", "plan": "basic", "keys": ["key-a", "key-b"]},
                {"id": "open", "plan": "basic"},
                {"id": "frozen", "plan": "basic", "keys": ["key-f"], "state": "suspended"},
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def status(path: str, **headers: str) -> int:
                return client.get(path, headers=headers).status_code

            assert status("/echo/a", **{"X-App-Id": "app1", "X-App-Key": "key-a"}) == 200
            assert status("/echo/a?app_id=app1&app_key=key-b") == 200
            assert values(gw, "app1") == {("hits", "eternity"): 2}

            no_key = client.get("/echo/a", headers={"X-App-Id": "app1"})
            assert no_key.status_code == 401
            assert no_key.headers["www-authenticate"] == 'Key realm="echo"'
            assert "application key" in no_key.json()["detail"]
            nothing = client.get("/echo/a")
            assert nothing.status_code == 401 and "www-authenticate" in nothing.headers
            assert status("/echo/a", **{"X-App-Id": "app1", "X-App-Key": "wrong"}) == 403
            assert status("/echo/a", **{"X-App-Id": "ghost", "X-App-Key": "key-a"}) == 403
            # A key of one application does not open another.
            assert status("/echo/a", **{"X-App-Id": "frozen", "X-App-Key": "key-a"}) == 403
            suspended = client.get("/echo/a", headers={"X-App-Id": "frozen", "X-App-Key": "key-f"})
            assert suspended.status_code == 403 and "suspended" in suspended.json()["detail"]
            # An application without keys is identified by its id alone.
            assert status("/echo/a", **{"X-App-Id": "open"}) == 200
            assert values(gw, "open") == {("hits", "eternity"): 1}
            assert values(gw, "app1") == {("hits", "eternity"): 2}
            assert status("/echo/a", **{"X-App-Id": "app1", "X-App-Key": "key-a"}) == 200
            assert status("/echo/a", **{"X-App-Id": "app1", "X-App-Key": "key-a"}) == 429


def test_the_credential_read_is_hidden_from_the_upstream(tmp_path: Path) -> None:
    secret = "s" * 32
    bearer = "Bearer " + jwt.encode({"azp": "app1"}, secret, algorithm="HS256")
    apps = [{"id": "app1", "plan": "basic", "keys": ["k1"]}]
    with echo_upstream(tmp_path) as upstream:

        def product(name: str, auth: dict[str, Any], **more: Any) -> dict[str, Any]:
            return example_product(
                upstream,
                name=name,
                path_prefix=f"/{name}",
                auth=auth,
                plans=[{"name": "basic", "limits": []}],
                applications=apps,
                **more,
            )

        jwt_auth = {"type": "jwt", "keys": [{"secret": secret}], "algorithms": ["HS256"]}
        products = [
            product("key", {"type": "api_key"}),
            product("pair", {"type": "app_id_key"}),
            product("token", jwt_auth),
            product("shown", {"type": "api_key"}, hide_credentials=False),
        ]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def upstream_saw(path: str, headers: Any = ()) -> tuple[dict[str, str], str]:
                answer = client.get(path, headers=headers)
                assert answer.status_code == 200, answer.text
                doc = answer.json()
                return doc["headers"], doc["query"]

            # The header read is removed, every field of it; other fields go through.
            seen, query = upstream_saw(
                "/key/a?user_key=k1", [("X-API-Key", "k1"), ("X-API-Key", "k2"), ("X-Other", "1")]
            )
            assert "x-api-key" not in seen and seen["x-other"] == "1"
            # The header was read, not the parameter: that stays.
            assert query == "user_key=k1"
            # The parameter read is removed wherever it is; the rest is kept byte for byte.
            _, query = upstream_saw("/key/a?a=1&user_key=k1&b=%2F+x%3d&&user%5Fkey=k2&c")
            assert query == "a=1&b=%2F+x%3d&&c"
            _, query = upstream_saw("/key/a?user_key=k1")
            assert query == ""

            seen, query = upstream_saw("/pair/a?app_key=k1&z=9", {"X-App-Id": "app1"})
            assert "x-app-id" not in seen and query == "z=9"
            seen, query = upstream_saw("/pair/a?app_id=app1&z=9", {"X-App-Key": "k1"})
            assert "x-app-key" not in seen and query == "z=9"

            seen, _ = upstream_saw("/token/a", {"Authorization": bearer})
            assert "authorization" not in seen

            seen, query = upstream_saw("/shown/a?user_key=k1", {"X-API-Key": "k1"})
            assert seen["x-api-key"] == "k1" and query == "user_key=k1"
            _, query = upstream_saw("/shown/a?user_key=k1")
            assert query == "user_key=k1"


class _Jwks:
    """A JWK set served over HTTP by a thread of the test, counting its fetches."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                jwks.fetches += 1
                body = json.dumps(jwks.doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"


@contextmanager
def jwks_server() -> Iterator[_Jwks]:
    jwks = _Jwks()
    thread = threading.Thread(target=jwks.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield jwks
    finally:
        jwks.server.shutdown()
        jwks.server.server_close()


def test_jwt_against_a_jwks_url(tmp_path: Path) -> None:
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())

    def token(key: rsa.RSAPrivateKey = signer, kid: str = "k1", **claims: Any) -> str:
        body = {"iss": "https://idp.test", "aud": "shop", "azp": "web", "exp": now + 600}
        body.update(claims)
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})

    def bearer(value: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {value}"}

    with jwks_server() as jwks, echo_upstream(tmp_path) as upstream:
        public = RSAAlgorithm.to_jwk(signer.public_key(), as_dict=True)
        jwks.doc = {"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}
        product = example_product(
            upstream,
            auth={
                "type": "jwt",
                "jwks_url": jwks.url,
                "issuer": "https://idp.test",
                "audience": "shop",
            },
            plans=ETERNAL,
            applications=[
                {"id": "app1", "plan": "basic", "client_id": "web"},
                {"id": "cli", "plan": "basic"},
                {"id": "old", "plan": "basic", "client_id": "legacy", "state": "suspended"},
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            missing = client.get("/echo/a")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == 'Bearer realm="echo"'

            ok = client.get("/echo/a", headers=bearer(token()))
            assert ok.status_code == 200, ok.text
            assert ok.headers["ratelimit"] == '"hits-eternity";r=2'
            assert client.get("/echo/a", headers=bearer(token(azp="cli"))).status_code == 200
            assert values(gw, "app1") == {("hits", "eternity"): 1}
            assert values(gw, "cli") == {("hits", "eternity"): 1}
            assert jwks.fetches == 1  # fetched on first use, then cached

            def refused(value: str) -> tuple[int, str]:
                answer = client.get("/echo/a", headers=bearer(value))
                return answer.status_code, answer.headers.get("www-authenticate", "")

            for bad in (
                token(exp=now - 3600),
                token(key=stranger),
                token(aud="other"),
                token(iss="https://evil.test"),
                token(kid="unknown"),
                "not-a-jwt",
            ):
                code, challenge = refused(bad)
                assert code == 401
                assert challenge.startswith('Bearer realm="echo", error="invalid_token"')
            assert refused(token(azp="nobody"))[0] == 403
            assert refused(token(azp="legacy"))[0] == 403
            basic = client.get("/echo/a", headers={"Authorization": "Basic dTpw"})
            assert basic.status_code == 401
            # Refused tokens counted nothing.
            assert values(gw, "app1") == {("hits", "eternity"): 1}


def test_jwt_keys_unreachable_is_503(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        nowhere = f"http://127.0.0.1:{free_port()}/jwks.json"
        product = example_product(
            upstream,
            auth={"type": "jwt", "jwks_url": nowhere},
            applications=[{"id": "app1", "plan": "basic"}],
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode({"azp": "app1"}, key, algorithm="RS256", headers={"kid": "k1"})
        with run_gateway(gateway_config([product]), tmp_path) as gw:
            for _ in range(2):
                answer = httpx.get(
                    f"{gw.url}/echo/a",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=TIMEOUT,
                )
                assert answer.status_code == 503
                assert answer.json()["title"] == "keys unavailable"
            assert "JWKS fetch from" in gw.proc.stderr()
