"""Credentials: from a request to the product's application (3scale auth modes).

``Authenticator.for_product(product)`` builds one authenticator per product. The
gateway calls :meth:`Authenticator.authenticate_nowait` first: it decides without
awaiting anything and returns None only when a JWT needs keys fetched from the JWKS
URL, in which case the gateway awaits :meth:`Authenticator.authenticate`. That keeps
the common path free of a coroutine per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import urllib.request
from collections.abc import Iterable
from http.client import HTTPException
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from meshgate.config.model import (
    ApiKeyAuth,
    AppIdKeyAuth,
    Application,
    JwtAuth,
    JwtKey,
    MtlsAuth,
    NoAuth,
    Product,
)
from meshgate.proxy import Request, Response, problem, subject_key

__all__ = ["AuthError", "Authenticator"]

log = logging.getLogger(__name__)

_JWKS_TIMEOUT = 3.0
_JWKS_MAX_BYTES = 1_048_576
_KID_REFETCH_INTERVAL = 30.0
_RETRY_AFTER_FAILURE = 5.0
_monotonic = time.monotonic

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_EC_ALGS = {
    "secp256r1": frozenset({"ES256"}),
    "secp384r1": frozenset({"ES384"}),
    "secp521r1": frozenset({"ES512", "ES521"}),
    "secp256k1": frozenset({"ES256K"}),
}


class AuthError(Exception):
    """The request is refused: 401 (no or bad credential), 403 (refused), 503 (keys unavailable).

    ``www_authenticate`` is the RFC 6750 challenge for bearer-token failures.
    """

    def __init__(
        self, status: int, title: str, detail: str, www_authenticate: str | None = None
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.www_authenticate = www_authenticate

    def response(self) -> Response:
        """The problem+json answer, with the challenge header when there is one."""
        resp = problem(self.status, self.title, self.detail)
        if self.www_authenticate is not None:
            resp.headers.set("www-authenticate", self.www_authenticate)
        return resp


class Authenticator:
    """Finds the application a request's credential belongs to."""

    @staticmethod
    def for_product(product: Product) -> Authenticator:
        """The authenticator for ``product.auth``; ValueError for unusable JWT keys."""
        auth = product.auth
        if isinstance(auth, ApiKeyAuth):
            return _ApiKey(auth, product.applications, product.name, product.key_salt)
        if isinstance(auth, AppIdKeyAuth):
            return _AppIdKey(auth, product.applications, product.name, product.key_salt)
        if isinstance(auth, JwtAuth):
            return _Jwt(auth, product.applications, product.name)
        if isinstance(auth, NoAuth):
            return _NoAuth(auth, product.applications)
        if isinstance(auth, MtlsAuth):
            return _Mtls(product.applications)
        raise TypeError(f"unknown auth mode {auth!r}")

    def authenticate_nowait(self, request: Request) -> Application | None:
        """The application, or None when only :meth:`authenticate` can decide."""
        raise NotImplementedError

    async def authenticate(self, request: Request) -> Application:
        """The application; raises :class:`AuthError`."""
        app = self.authenticate_nowait(request)
        assert app is not None, "only JWT authentication awaits"
        return app

    def hide(self, request: Request) -> None:
        """Remove from ``request`` the credential authentication read: the header, or the
        query parameter (every field or parameter of that name; the rest of the query is
        kept byte for byte), so that the upstream never sees it (Kong's hide_credentials)."""


def _admit(app: Application) -> Application:
    if app.state != "live":
        raise AuthError(
            403, "application suspended", "the application this credential belongs to is suspended"
        )
    return app


def _query_param(query: str, name: str) -> str | None:
    if not query:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value or None
    return None


def _lookup(request: Request, header: str | None, param: str | None) -> str | None:
    """A credential from the header, else the query parameter; empty counts as missing."""
    value = request.headers.get(header) if header is not None else None
    if not value and param is not None:
        value = _query_param(request.query, param)
    return value or None


def _hide(request: Request, header: str | None, param: str | None) -> None:
    """Remove what :func:`_lookup` read: the header if it held a value, else the parameter."""
    if header is not None and request.headers.get(header):
        request.headers.remove(header)
    elif param is not None and request.query:
        request.query = _without_param(request.query, param)


def _without_param(query: str, name: str) -> str:
    """``query`` without the parameter ``name`` as ``parse_qsl`` reads names; the other
    parameters (and separators) byte for byte."""
    kept = [
        item
        for item in query.split("&")
        if unquote_plus(item.partition("=")[0], errors="replace") != name
    ]
    return "&".join(kept)


def _where(header: str | None, param: str | None) -> str:
    places = []
    if header is not None:
        places.append(f"the {header} header")
    if param is not None:
        places.append(f"the {param} query parameter")
    return " or ".join(places)


def _key_challenge(realm: str) -> str:
    # A 401 must carry a challenge (RFC 9110 15.5.2); "Key" is the scheme Kong's key-auth uses.
    return f'Key realm="{realm}"'


class _KeyHasher:
    """``sha256:<hex>`` of a received key under the product's salt, as ``hash_key`` computes
    it (the salt's bytes, then the key's UTF-8 bytes: what a header carries as received)."""

    __slots__ = ("_salted",)

    def __init__(self, salt: str) -> None:
        self._salted = hashlib.sha256(bytes.fromhex(salt))

    def __call__(self, key: bytes) -> str:
        digest = self._salted.copy()
        digest.update(key)
        return "sha256:" + digest.hexdigest()


# Keys found through their hash, kept per authenticator (rebuilt with each configuration):
# a known key is hashed once, not on every request. Bounded; unknown keys are never kept.
_HASHED_CACHE_SIZE = 4096


class _ApiKey(Authenticator):
    def __init__(
        self, auth: ApiKeyAuth, apps: Iterable[Application], realm: str, salt: str | None
    ) -> None:
        apps = list(apps)
        self._header = auth.header
        self._param = auth.query
        self._by_key = {key: app for app in apps for key in app.keys}
        # The hot path: the header's bytes as received, looked up without decoding. A key
        # that is not latin-1 can never be received, so it has no entry here.
        self._header_raw = auth.header.lower().encode("latin-1") if auth.header else None
        self._by_raw: dict[bytes, Application] = {}
        for key, app in self._by_key.items():
            try:
                self._by_raw[key.encode("latin-1")] = app
            except UnicodeEncodeError:
                pass
        self._by_hash = {digest: app for app in apps for digest in app.key_hashes}
        # Only a product with hashed keys hashes what it receives.
        self._hasher = _KeyHasher(salt) if salt is not None and self._by_hash else None
        self._hashed: dict[bytes, Application] = {}
        self._missing = f"expected an API key in {_where(auth.header, auth.query)}"
        self._challenge = _key_challenge(realm)

    def authenticate_nowait(self, request: Request) -> Application:
        raw = None
        if self._header_raw is not None:
            raw = request.headers.get_raw(self._header_raw)
            if raw:
                known = self._by_raw.get(raw)
                if known is None and self._hasher is not None:
                    known = self._by_hashed_key(raw)
                if known is not None:
                    return _admit(known)
        key = _lookup(request, self._header, self._param)
        if key is None:
            raise AuthError(401, "credential missing", self._missing, self._challenge)
        app = self._by_key.get(key)
        if app is None and self._hasher is not None and not raw:
            # From the query string (a header key was hashed above): its UTF-8 bytes.
            app = self._by_hashed_key(key.encode())
        if app is None:
            raise AuthError(403, "credential invalid", "the API key is not valid")
        return _admit(app)

    def hide(self, request: Request) -> None:
        _hide(request, self._header, self._param)

    def _by_hashed_key(self, key: bytes) -> Application | None:
        assert self._hasher is not None
        app = self._hashed.get(key)
        if app is None:
            app = self._by_hash.get(self._hasher(key))
            if app is not None and len(self._hashed) < _HASHED_CACHE_SIZE:
                self._hashed[key] = app
        return app


class _AppIdKey(Authenticator):
    def __init__(
        self, auth: AppIdKeyAuth, apps: Iterable[Application], realm: str, salt: str | None
    ) -> None:
        self._id_at = (auth.app_id_header, auth.app_id_query)
        self._key_at = (auth.app_key_header, auth.app_key_query)
        self._by_id = {
            app.id: (app, frozenset(app.keys), frozenset(app.key_hashes)) for app in apps
        }
        hashed = any(found[2] for found in self._by_id.values())
        self._hasher = _KeyHasher(salt) if salt is not None and hashed else None
        self._id_missing = f"expected an application id in {_where(*self._id_at)}"
        self._key_missing = f"expected an application key in {_where(*self._key_at)}"
        self._challenge = _key_challenge(realm)

    def authenticate_nowait(self, request: Request) -> Application:
        app_id = _lookup(request, *self._id_at)
        if app_id is None:
            raise AuthError(401, "credential missing", self._id_missing, self._challenge)
        app_key = _lookup(request, *self._key_at)
        found = self._by_id.get(app_id)
        # Like Apisonator, an application without keys is identified by its id alone.
        if found is not None and not found[1] and not found[2]:
            return _admit(found[0])
        if app_key is None:
            raise AuthError(401, "credential missing", self._key_missing, self._challenge)
        if found is None or (app_key not in found[1] and not self._hash_matches(request, found[2])):
            raise AuthError(403, "credential invalid", "the application id or key is not valid")
        return _admit(found[0])

    def hide(self, request: Request) -> None:
        _hide(request, *self._id_at)
        _hide(request, *self._key_at)

    def _hash_matches(self, request: Request, hashes: frozenset[str]) -> bool:
        if not hashes or self._hasher is None:
            return False
        key = _lookup_bytes(request, *self._key_at)
        return key is not None and self._hasher(key) in hashes


def _lookup_bytes(request: Request, header: str | None, param: str | None) -> bytes | None:
    """What :func:`_lookup` finds, as the bytes a key was sent as: a header's bytes as
    received (decoded as latin-1 by the engine), a query parameter's UTF-8."""
    value = request.headers.get(header) if header is not None else None
    if value:
        return value.encode("latin-1")
    if param is not None:
        found = _query_param(request.query, param)
        if found:
            return found.encode()
    return None


class _NoAuth(Authenticator):
    def __init__(self, auth: NoAuth, apps: Iterable[Application]) -> None:
        self._app = next(app for app in apps if app.id == auth.default_application)

    def authenticate_nowait(self, request: Request) -> Application:
        return _admit(self._app)


class _Mtls(Authenticator):
    """The client certificate the TLS listener verified names the application."""

    def __init__(self, apps: Iterable[Application]) -> None:
        self.by_sha256: dict[str, Application] = {}
        self.by_subject: dict[tuple[str, ...], Application] = {}
        self.by_san: dict[str, Application] = {}
        for app in apps:
            for cert in app.certificates:
                if cert.sha256 is not None:
                    self.by_sha256[cert.sha256.replace(":", "").lower()] = app
                elif cert.subject is not None:
                    for order in subject_key(cert.subject):
                        self.by_subject[order] = app
                elif cert.san is not None:
                    self.by_san[cert.san] = app

    def authenticate_nowait(self, request: Request) -> Application:
        tls = request.tls
        if tls is None or tls.peer is None:
            raise AuthError(
                401,
                "client certificate required",
                "this API identifies applications by TLS client certificate: call it over "
                "HTTPS with a certificate signed by a CA the gateway trusts",
            )
        peer = tls.peer
        app = self.by_sha256.get(peer.sha256)
        if app is None and self.by_subject:
            app = self.by_subject.get(peer.subject_key)
        if app is None and self.by_san:
            for san in peer.sans:
                app = self.by_san.get(san)
                if app is not None:
                    break
        if app is None:
            raise AuthError(
                403,
                "unknown client certificate",
                f"no application holds this client certificate (sha256 {peer.sha256})",
            )
        return _admit(app)


class _Key(NamedTuple):
    kid: str | None
    algorithms: frozenset[str]
    key: Any


class _Token(NamedTuple):
    token: str
    kid: str | None
    alg: str


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, bytes):
        return _HMAC_ALGS
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGS.get(key.curve.name, frozenset())
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _from_jwk(doc: dict[str, Any], allowed: frozenset[str]) -> _Key:
    """A key from a JWK; PyJWTError or ValueError when it is not a usable signing key."""
    if doc.get("use", "sig") != "sig":
        raise ValueError("not a signature key")
    key = jwt.PyJWK(doc).key
    algs = _algorithms_for(key) & allowed
    if "alg" in doc:
        algs &= {doc["alg"]}
    kid = doc.get("kid")
    return _Key(kid if isinstance(kid, str) else None, algs, key)


def _from_config(cfg: JwtKey, allowed: frozenset[str]) -> _Key:
    if cfg.secret is not None:
        key: Any = cfg.secret.encode()
    elif cfg.pem is not None:
        data = cfg.pem.encode()
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    else:
        assert cfg.jwk is not None
        found = _from_jwk(cfg.jwk, allowed)
        key = found.key
    algs = _algorithms_for(key) & allowed
    if cfg.algorithm is not None:
        algs &= {cfg.algorithm}
    return _Key(cfg.kid, algs, key)


def _fetch_jwks(url: str, allowed: frozenset[str]) -> list[_Key]:
    """GET the JWK set (blocking: run in a thread); unusable keys are skipped."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=_JWKS_TIMEOUT) as resp:
        body = resp.read(_JWKS_MAX_BYTES + 1)
    if len(body) > _JWKS_MAX_BYTES:
        raise ValueError(f"JWK set larger than {_JWKS_MAX_BYTES} bytes")
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWK set: expected {"keys": [...]}')
    keys = []
    for entry in doc["keys"]:
        try:
            key = _from_jwk(entry, allowed)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if key.algorithms:
            keys.append(key)
    return keys


class _Jwt(Authenticator):
    def __init__(self, auth: JwtAuth, apps: Iterable[Application], realm: str) -> None:
        self._auth = auth
        self._allowed = frozenset(auth.algorithms) - {"none"}
        self._realm = realm
        self._by_client = {app.client_id or app.id: app for app in apps}
        self._options: dict[str, Any] = {"verify_aud": auth.audience is not None}
        self._inline: list[_Key] = []
        for i, cfg in enumerate(auth.keys):
            key = _from_config(cfg, self._allowed)
            if not key.algorithms:
                raise ValueError(
                    f"jwt key {cfg.kid or i!r} can verify none of the allowed algorithms "
                    f"{sorted(self._allowed)}; add its algorithm to auth.algorithms"
                )
            self._inline.append(key)
        url = auth.jwks_url
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"jwks_url must be an http:// or https:// URL, not {url!r}")
        self._jwks_url = url
        self._jwks: list[_Key] = []
        self._jwks_loaded = False
        self._kids = frozenset(k.kid for k in self._inline)
        self._next_fetch_at = 0.0
        self._kid_refetch_at = 0.0
        self._fetching: asyncio.Task[None] | None = None

    def authenticate_nowait(self, request: Request) -> Application | None:
        token = self._token(request)
        if self._must_fetch(token.kid):
            return None
        return self._verify(token)

    async def authenticate(self, request: Request) -> Application:
        token = self._token(request)
        if self._must_fetch(token.kid):
            await self._refresh()
        return self._verify(token)

    def hide(self, request: Request) -> None:
        request.headers.remove(self._auth.header)

    def _refused(self, error: str, description: str) -> AuthError:
        challenge = (
            f'Bearer realm="{self._realm}", error="{error}", error_description="{description}"'
        )
        return AuthError(401, "invalid token", f"{error}: {description}", challenge)

    def _token(self, request: Request) -> _Token:
        value = request.headers.get(self._auth.header)
        if not value:
            raise AuthError(
                401,
                "credential missing",
                f"expected a bearer token in the {self._auth.header} header",
                f'Bearer realm="{self._realm}"',
            )
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(
                401,
                "credential missing",
                f"expected '{self._auth.header}: Bearer <token>'",
                f'Bearer realm="{self._realm}", error="invalid_request"',
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise self._refused("invalid_token", "the token is malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise self._refused("invalid_token", "the token's algorithm is not accepted")
        return _Token(token, kid if isinstance(kid, str) else None, alg)

    def _must_fetch(self, kid: str | None) -> bool:
        if self._jwks_url is None:
            return False
        now = _monotonic()
        if now >= self._next_fetch_at:
            return True
        if kid is None or kid in self._kids:
            return False
        # An unknown kid may be a rotated key: join a fetch in flight, else refetch rarely.
        return self._fetching is not None or now >= self._kid_refetch_at

    async def _refresh(self) -> None:
        task = self._fetching
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._fetching = task
        # Shielded: one caller giving up must not cancel the fetch the others await.
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        assert self._jwks_url is not None
        self._kid_refetch_at = _monotonic() + _KID_REFETCH_INTERVAL
        try:
            keys = await asyncio.to_thread(_fetch_jwks, self._jwks_url, self._allowed)
        except (OSError, ValueError, HTTPException) as exc:
            log.warning("JWKS fetch from %s failed: %s", self._jwks_url, exc)
            retry = min(_RETRY_AFTER_FAILURE, self._auth.jwks_cache_seconds)
            self._next_fetch_at = _monotonic() + retry
            return
        finally:
            self._fetching = None
        self._jwks, self._jwks_loaded = keys, True
        self._kids = frozenset(k.kid for k in (*self._inline, *keys))
        self._next_fetch_at = _monotonic() + self._auth.jwks_cache_seconds

    def _candidates(self, token: _Token) -> list[_Key]:
        keys = [k for k in (*self._inline, *self._jwks) if token.alg in k.algorithms]
        if token.kid is not None:
            with_kid = [k for k in keys if k.kid == token.kid]
            if with_kid:
                return with_kid
        return [k for k in keys if token.kid is None or k.kid is None]

    def _verify(self, token: _Token) -> Application:
        candidates = self._candidates(token)
        if not candidates:
            if self._jwks_url is not None and not self._jwks_loaded:
                raise AuthError(
                    503, "keys unavailable", "the token signing keys (JWKS) could not be fetched"
                )
            raise self._refused("invalid_token", "no key matches the token's kid and algorithm")
        auth = self._auth
        claims: dict[str, Any] | None = None
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token.token,
                    candidate.key,
                    algorithms=[token.alg],
                    options=self._options,  # type: ignore[arg-type]
                    audience=auth.audience,
                    issuer=auth.issuer,
                    leeway=auth.leeway_seconds,
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise self._refused("invalid_token", "the token has expired") from None
            except jwt.ImmatureSignatureError:
                raise self._refused("invalid_token", "the token is not valid yet") from None
            except jwt.InvalidAudienceError:
                raise self._refused("invalid_token", "the token's audience is wrong") from None
            except jwt.InvalidIssuerError:
                raise self._refused("invalid_token", "the token's issuer is wrong") from None
            except jwt.MissingRequiredClaimError as exc:
                missing = f"the token has no {exc.claim} claim"
                raise self._refused("invalid_token", missing) from None
            except jwt.PyJWTError:
                raise self._refused("invalid_token", "the token is invalid") from None
        if claims is None:
            raise self._refused("invalid_token", "the token signature is invalid")
        client = claims.get(auth.app_claim)
        if not isinstance(client, str) or not client:
            raise self._refused("invalid_token", f"the token has no {auth.app_claim} claim")
        app = self._by_client.get(client)
        if app is None:
            raise AuthError(403, "credential invalid", "the token's client is not an application")
        return _admit(app)
