"""Credentials: api_key, app_id_key, jwt (inline keys and a real JWKS server), none."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshgate.config.model import Application, Product
from meshgate.gateway import credentials
from meshgate.gateway.credentials import Authenticator, AuthError
from meshgate.proxy import Headers, Request

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())
SECRET = "s3cret-long-enough-for-hs256-keys-32b"

APPS = [
    {"id": "app1", "plan": "basic", "keys": ["k1", "k1-bis"], "client_id": "client-1"},
    {"id": "app2", "plan": "basic", "keys": ["k2"]},
    {"id": "open", "plan": "basic"},
    {"id": "gone", "plan": "basic", "keys": ["k3"], "state": "suspended"},
]


def product(auth: dict[str, Any], apps: list[dict[str, Any]] = APPS) -> Product:
    return Product.model_validate(
        {
            "name": "shop",
            "backend": "http://127.0.0.1:9001",
            "auth": auth,
            "plans": [{"name": "basic"}],
            "applications": apps,
        }
    )


def request(headers: dict[str, str] | None = None, query: str = "") -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request("GET", b"/", "/", query, Headers(raw))


def refused(auth: Authenticator, req: Request) -> AuthError:
    with pytest.raises(AuthError) as caught:
        asyncio.run(auth.authenticate(req))
    return caught.value


def app_id(auth: Authenticator, req: Request) -> str:
    return asyncio.run(auth.authenticate(req)).id


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def token(key: Any, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
    payload = {"azp": "client-1", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def bearer(tok: str) -> Request:
    return request({"Authorization": f"Bearer {tok}"})


# api_key


def test_api_key_from_the_default_header_or_query_parameter() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    assert auth.authenticate_nowait(request({"X-API-Key": "k1"})) is not None
    assert app_id(auth, request({"x-api-key": "k1-bis"})) == "app1"
    assert app_id(auth, request(query="a=1&user_key=k2")) == "app2"


def test_api_key_header_wins_over_query() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    assert app_id(auth, request({"X-API-Key": "k2"}, query="user_key=k1")) == "app2"


def test_api_key_only_where_configured() -> None:
    auth = Authenticator.for_product(product({"type": "api_key", "header": "Apikey"}))
    assert app_id(auth, request({"Apikey": "k1"})) == "app1"
    err = refused(auth, request(query="user_key=k1"))
    assert err.status == 401
    assert "Apikey header" in err.detail and "query" not in err.detail


def test_api_key_missing_is_401_saying_where_it_was_expected() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    for req in (request(), request({"X-API-Key": ""}), request(query="user_key=")):
        err = refused(auth, req)
        assert err.status == 401
        assert "X-API-Key header" in err.detail and "user_key query parameter" in err.detail


def test_api_key_unknown_is_403_and_suspended_is_403_with_its_own_detail() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    unknown = refused(auth, request({"X-API-Key": "nope"}))
    suspended = refused(auth, request({"X-API-Key": "k3"}))
    assert unknown.status == suspended.status == 403
    assert "suspended" in suspended.detail and "suspended" not in unknown.detail


def test_api_key_empty_header_falls_back_to_the_query_parameter() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    assert app_id(auth, request({"X-API-Key": ""}, query="user_key=k2")) == "app2"


def test_api_key_matches_exact_bytes_including_non_ascii_keys() -> None:
    apps = [
        {"id": "app1", "plan": "basic", "keys": ["clé"]},
        {"id": "app2", "plan": "basic", "keys": ["鍵"]},  # not latin-1: never in a field
    ]
    auth = Authenticator.for_product(product({"type": "api_key"}, apps))
    field = [(b"x-api-key", "clé".encode("latin-1"))]
    assert (
        asyncio.run(auth.authenticate(Request("GET", b"/", "/", "", Headers(field)))).id == "app1"
    )
    assert refused(auth, request({"X-API-Key": "CLÉ"})).status == 403
    assert app_id(auth, request(query="user_key=%E9%8D%B5")) == "app2"


def test_api_key_decides_without_awaiting() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    app = auth.authenticate_nowait(request({"X-API-Key": "k1"}))
    assert isinstance(app, Application) and app.id == "app1"
    with pytest.raises(AuthError):
        auth.authenticate_nowait(request({"X-API-Key": "nope"}))


def test_auth_error_response_is_problem_json() -> None:
    auth = Authenticator.for_product(product({"type": "api_key"}))
    resp = refused(auth, request()).response()
    assert resp.status == 401
    assert resp.headers.get("content-type") == "application/problem+json"
    assert json.loads(resp.body)["title"] == "credential missing"
    assert resp.headers.get("www-authenticate") == 'Key realm="shop"'


# app_id_key


APP_ID_KEY = {"type": "app_id_key"}


def test_app_id_key_from_headers_or_query() -> None:
    auth = Authenticator.for_product(product(APP_ID_KEY))
    assert app_id(auth, request({"X-App-Id": "app1", "X-App-Key": "k1-bis"})) == "app1"
    assert app_id(auth, request(query="app_id=app2&app_key=k2")) == "app2"
    assert app_id(auth, request({"X-App-Id": "app2"}, query="app_key=k2")) == "app2"


def test_app_id_key_custom_names() -> None:
    auth = Authenticator.for_product(
        product(
            {**APP_ID_KEY, "app_id_header": "Id", "app_key_header": "Key", "app_id_query": None}
        )
    )
    assert app_id(auth, request({"Id": "app1", "Key": "k1"})) == "app1"
    assert refused(auth, request(query="app_id=app1&app_key=k1")).status == 401


def test_app_id_key_missing_either_is_401() -> None:
    auth = Authenticator.for_product(product(APP_ID_KEY))
    assert refused(auth, request({"X-App-Key": "k1"})).status == 401
    err = refused(auth, request({"X-App-Id": "app1"}))
    assert err.status == 401 and "application key" in err.detail
    assert refused(auth, request({"X-App-Id": "unknown"})).status == 401


def test_app_id_key_unknown_id_and_wrong_key_are_the_same_403() -> None:
    auth = Authenticator.for_product(product(APP_ID_KEY))
    unknown = refused(auth, request({"X-App-Id": "nobody", "X-App-Key": "k1"}))
    wrong = refused(auth, request({"X-App-Id": "app1", "X-App-Key": "k2"}))
    assert unknown.status == wrong.status == 403
    assert unknown.detail == wrong.detail


def test_app_id_alone_for_an_application_without_keys() -> None:
    auth = Authenticator.for_product(product(APP_ID_KEY))
    assert app_id(auth, request({"X-App-Id": "open"})) == "open"
    assert app_id(auth, request({"X-App-Id": "open", "X-App-Key": "anything"})) == "open"


def test_app_id_key_suspended_is_403() -> None:
    auth = Authenticator.for_product(product(APP_ID_KEY))
    err = refused(auth, request({"X-App-Id": "gone", "X-App-Key": "k3"}))
    assert err.status == 403 and "suspended" in err.detail


# none


def test_none_is_the_default_application() -> None:
    auth = Authenticator.for_product(product({"type": "none", "default_application": "app2"}))
    assert app_id(auth, request()) == "app2"
    assert app_id(auth, request({"X-API-Key": "k1"})) == "app2"


# jwt with inline keys


def jwt_auth(**auth: Any) -> Authenticator:
    return Authenticator.for_product(product({"type": "jwt", **auth}))


def test_jwt_rs256_with_a_pem_key() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    app = auth.authenticate_nowait(bearer(token(RSA_A)))
    assert app is not None and app.id == "app1"
    assert app_id(auth, bearer(token(RSA_A, "PS256"))) == "app1"


def test_jwt_es256_with_a_pem_key() -> None:
    auth = jwt_auth(keys=[{"pem": pem(EC_A)}])
    assert app_id(auth, bearer(token(EC_A, "ES256"))) == "app1"


def test_jwt_es256_with_a_jwk() -> None:
    jwk = ECAlgorithm.to_jwk(EC_A.public_key(), as_dict=True)
    auth = jwt_auth(keys=[{"jwk": jwk}])
    assert app_id(auth, bearer(token(EC_A, "ES256"))) == "app1"


def test_jwt_hs256_with_a_secret() -> None:
    auth = jwt_auth(keys=[{"secret": SECRET}], algorithms=["HS256"])
    assert app_id(auth, bearer(token(SECRET, "HS256"))) == "app1"
    assert refused(auth, bearer(token(SECRET + "x", "HS256"))).status == 401


def test_jwt_secret_without_an_hs_algorithm_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="allowed algorithms"):
        jwt_auth(keys=[{"secret": SECRET}])


def test_jwt_application_by_id_when_no_client_id() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    assert app_id(auth, bearer(token(RSA_A, azp="app2"))) == "app2"
    assert refused(auth, bearer(token(RSA_A, azp="app1"))).status == 403


def test_jwt_custom_app_claim_and_header() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}], app_claim="cid", header="X-Token")
    tok = token(RSA_A, azp="ignored", cid="app2")
    assert app_id(auth, request({"X-Token": f"Bearer {tok}"})) == "app2"
    assert refused(auth, bearer(tok)).status == 401


# Offsets from the time the test runs, not from collection: a long run outlasts 300 s.
@pytest.mark.parametrize(
    ("claim", "offset", "needle"),
    [("exp", -30, "expired"), ("nbf", 300, "not valid yet")],
)
def test_jwt_time_claims(claim: str, offset: int, needle: str) -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    err = refused(auth, bearer(token(RSA_A, **{claim: int(time.time()) + offset})))
    assert err.status == 401 and needle in err.detail
    assert err.www_authenticate is not None
    assert 'error="invalid_token"' in err.www_authenticate
    assert err.response().headers.get("www-authenticate") == err.www_authenticate


def test_jwt_leeway_accepts_slight_clock_skew() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}], leeway_seconds=60)
    now = int(time.time())
    assert app_id(auth, bearer(token(RSA_A, exp=now - 30))) == "app1"
    assert app_id(auth, bearer(token(RSA_A, nbf=now + 30))) == "app1"
    assert refused(auth, bearer(token(RSA_A, exp=now - 120))).status == 401


def test_jwt_issuer_and_audience() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}], issuer="https://idp", audience=["api", "other"])
    assert app_id(auth, bearer(token(RSA_A, iss="https://idp", aud="api"))) == "app1"
    wrong_iss = refused(auth, bearer(token(RSA_A, iss="https://evil", aud="api")))
    wrong_aud = refused(auth, bearer(token(RSA_A, iss="https://idp", aud="elsewhere")))
    no_aud = refused(auth, bearer(token(RSA_A, iss="https://idp")))
    assert (wrong_iss.status, wrong_aud.status, no_aud.status) == (401, 401, 401)
    assert "issuer" in wrong_iss.detail and "audience" in wrong_aud.detail
    assert "aud" in no_aud.detail


def test_jwt_audience_not_configured_accepts_any_audience() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    assert app_id(auth, bearer(token(RSA_A, aud="whatever"))) == "app1"


def test_jwt_alg_none_is_refused_even_if_listed() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}], algorithms=["RS256", "none"])
    unsigned = jwt.encode({"azp": "client-1"}, None, algorithm="none")
    err = refused(auth, bearer(unsigned))
    assert err.status == 401 and "algorithm" in err.detail


def test_jwt_hs256_signed_with_the_public_key_is_refused() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}], algorithms=["RS256", "HS256"])

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(b'{"azp":"client-1"}')
    mac = hmac.new(pem(RSA_A).encode(), signing_input.encode(), hashlib.sha256).digest()
    assert refused(auth, bearer(f"{signing_input}.{b64(mac)}")).status == 401


def test_jwt_wrong_key_is_401() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    err = refused(auth, bearer(token(RSA_B)))
    assert err.status == 401 and "signature" in err.detail


def test_jwt_kid_selects_the_key() -> None:
    auth = jwt_auth(keys=[{"kid": "a", "pem": pem(RSA_A)}, {"kid": "b", "pem": pem(RSA_B)}])
    assert app_id(auth, bearer(token(RSA_B, kid="b"))) == "app1"
    assert app_id(auth, bearer(token(RSA_A, kid="a"))) == "app1"
    assert refused(auth, bearer(token(RSA_B, kid="a"))).status == 401
    assert refused(auth, bearer(token(RSA_A, kid="unknown"))).status == 401
    # Without a kid, every key of the right type is tried.
    assert app_id(auth, bearer(token(RSA_B))) == "app1"


def test_jwt_key_pinned_to_an_algorithm() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A), "algorithm": "RS256"}])
    assert app_id(auth, bearer(token(RSA_A, "RS256"))) == "app1"
    assert refused(auth, bearer(token(RSA_A, "PS256"))).status == 401


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer a.b.c"},
    ],
)
def test_jwt_missing_or_malformed_header_is_401(headers: dict[str, str]) -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    err = refused(auth, request(headers))
    assert err.status == 401
    assert err.www_authenticate is not None
    assert err.www_authenticate.startswith('Bearer realm="shop"')


def test_jwt_missing_header_challenge_has_no_error_code() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    assert refused(auth, request()).www_authenticate == 'Bearer realm="shop"'


def test_jwt_application_claim() -> None:
    auth = jwt_auth(keys=[{"pem": pem(RSA_A)}])
    no_claim = jwt.encode({"exp": int(time.time()) + 60}, RSA_A, algorithm="RS256")
    assert refused(auth, bearer(no_claim)).status == 401
    unknown = refused(auth, bearer(token(RSA_A, azp="stranger")))
    assert unknown.status == 403
    suspended = refused(auth, bearer(token(RSA_A, azp="gone")))
    assert suspended.status == 403 and "suspended" in suspended.detail


# jwt with a JWKS server


class JwksServer:
    """A real HTTP server on loopback serving a JWK set and counting fetches."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.body: bytes | None = None
        self.fetches = 0
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.fetches += 1
                time.sleep(server.delay)
                body = server.body if server.body is not None else json.dumps(server.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(credentials, "_monotonic", fake)
    return fake


def test_jwks_is_fetched_once_and_cached(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    auth = jwt_auth(jwks_url=jwks.url, jwks_cache_seconds=60)
    tok = bearer(token(RSA_A, kid="a"))
    assert auth.authenticate_nowait(tok) is None
    assert app_id(auth, tok) == "app1"
    assert jwks.fetches == 1
    app = auth.authenticate_nowait(tok)
    assert app is not None and app.id == "app1"
    assert app_id(auth, tok) == "app1"
    assert jwks.fetches == 1
    clock.now += 61
    assert auth.authenticate_nowait(tok) is None
    assert app_id(auth, tok) == "app1"
    assert jwks.fetches == 2


def test_jwks_unknown_kid_refetches_at_most_every_30_seconds(
    jwks: JwksServer, clock: Clock
) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    auth = jwt_auth(jwks_url=jwks.url)
    assert app_id(auth, bearer(token(RSA_A, kid="a"))) == "app1"
    assert jwks.fetches == 1

    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a"), rsa_jwk(RSA_B, "b")]}
    clock.now += 31
    rotated = bearer(token(RSA_B, kid="b"))
    assert auth.authenticate_nowait(rotated) is None
    assert app_id(auth, rotated) == "app1"
    assert jwks.fetches == 2

    # The JWK set was read moments ago: an unknown kid does not fetch it again yet.
    bogus = bearer(token(RSA_B, kid="c"))
    assert refused(auth, bogus).status == 401
    assert jwks.fetches == 2
    clock.now += 30
    assert auth.authenticate_nowait(bogus) is None
    assert refused(auth, bogus).status == 401
    assert jwks.fetches == 3
    for _ in range(5):
        clock.now += 5
        with pytest.raises(AuthError) as caught:
            auth.authenticate_nowait(bogus)
        assert caught.value.status == 401
        assert refused(auth, bogus).status == 401
    assert auth.authenticate_nowait(bearer(token(RSA_A, kid="a"))) is not None
    assert jwks.fetches == 3


def test_jwks_fetched_right_after_rotation_is_not_refetched(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    auth = jwt_auth(jwks_url=jwks.url)
    assert app_id(auth, bearer(token(RSA_A, kid="a"))) == "app1"
    jwks.jwks = {"keys": [rsa_jwk(RSA_B, "b")]}
    assert refused(auth, bearer(token(RSA_B, kid="b"))).status == 401
    assert jwks.fetches == 1
    clock.now += 30
    assert app_id(auth, bearer(token(RSA_B, kid="b"))) == "app1"
    assert jwks.fetches == 2
    assert refused(auth, bearer(token(RSA_A, kid="a"))).status == 401


def test_concurrent_requests_share_one_fetch(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    jwks.delay = 0.2
    auth = jwt_auth(jwks_url=jwks.url)
    req = bearer(token(RSA_A, kid="a"))

    async def many() -> list[Application]:
        return await asyncio.gather(*(auth.authenticate(req) for _ in range(20)))

    apps = asyncio.run(many())
    assert [a.id for a in apps] == ["app1"] * 20
    assert jwks.fetches == 1


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    jwks: JwksServer, clock: Clock
) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    jwks.delay = 0.2
    auth = jwt_auth(jwks_url=jwks.url)
    req = bearer(token(RSA_A, kid="a"))

    async def scenario() -> Application:
        impatient = asyncio.create_task(auth.authenticate(req))
        patient = asyncio.create_task(auth.authenticate(req))
        await asyncio.sleep(0.05)
        impatient.cancel()
        return await patient

    assert asyncio.run(scenario()).id == "app1"
    assert jwks.fetches == 1


def test_jwks_unreachable_without_cached_keys_is_503(clock: Clock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    auth = jwt_auth(jwks_url=f"http://127.0.0.1:{port}/jwks.json")
    err = refused(auth, bearer(token(RSA_A, kid="a")))
    assert err.status == 503
    assert refused(auth, bearer(token(RSA_A))).status == 503


def test_jwks_unreachable_keeps_serving_cached_keys(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_A, "a")]}
    auth = jwt_auth(jwks_url=jwks.url, jwks_cache_seconds=10)
    tok = bearer(token(RSA_A, kid="a"))
    assert app_id(auth, tok) == "app1"
    jwks.stop()
    clock.now += 11
    assert app_id(auth, tok) == "app1"
    # The failure is not retried on every request.
    assert auth.authenticate_nowait(tok) is not None
    jwks.httpd = ThreadingHTTPServer(("127.0.0.1", 0), jwks.httpd.RequestHandlerClass)
    jwks.thread = threading.Thread(target=jwks.httpd.serve_forever, daemon=True)
    jwks.thread.start()


def test_jwks_that_is_not_a_jwk_set_is_503(jwks: JwksServer, clock: Clock) -> None:
    jwks.body = b"<html>login</html>"
    auth = jwt_auth(jwks_url=jwks.url)
    assert refused(auth, bearer(token(RSA_A, kid="a"))).status == 503
    assert jwks.fetches == 1


def test_jwks_skips_unusable_keys(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {
        "keys": [
            {"kty": "RSA", "kid": "broken"},
            {**rsa_jwk(RSA_B, "enc"), "use": "enc"},
            {**rsa_jwk(RSA_B, "x"), "alg": "HS256"},
            rsa_jwk(RSA_A, "a"),
        ]
    }
    auth = jwt_auth(jwks_url=jwks.url)
    assert app_id(auth, bearer(token(RSA_A, kid="a"))) == "app1"
    assert refused(auth, bearer(token(RSA_B, kid="enc"))).status == 401


def test_inline_keys_and_jwks_together(jwks: JwksServer, clock: Clock) -> None:
    jwks.jwks = {"keys": [rsa_jwk(RSA_B, "remote")]}
    auth = jwt_auth(keys=[{"kid": "local", "pem": pem(RSA_A)}], jwks_url=jwks.url)
    assert app_id(auth, bearer(token(RSA_B, kid="remote"))) == "app1"
    assert app_id(auth, bearer(token(RSA_A, kid="local"))) == "app1"
    assert jwks.fetches == 1


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        jwt_auth(jwks_url="file:///etc/passwd")
