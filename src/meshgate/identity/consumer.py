"""The consumer token: who the API consumer is, carried from the edge through the mesh.

The edge gateway signs, with its workload identity, a short-lived JWT (ES256 for the P-256
keys workload certificates carry; RS256 or EdDSA for RSA or Ed25519 keys) naming the
product, the application (id and name), the account and the plan of each request it lets
through, and sends it upstream as ``x-meshgate-consumer``. Its certificate chain rides in
the token's ``x5c`` header, so a sidecar verifies it with nothing but its trust bundle:
the chain leads to a root of the bundle, the leaf names an edge gateway of the same trust
domain, and the token is in its lifetime.

Signing costs ~50 µs and a verification ~0.5 ms (~1 ms for a gateway's chain not seen
before), so neither happens per request: the gateway keeps a token per consumer and signs
it again at half its life; a sidecar keeps what it verified until it expires.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from meshgate.config.identity import SpiffeId
from meshgate.identity._material import Identity

__all__ = [
    "CONSUMER_HEADER",
    "Consumer",
    "ConsumerSigner",
    "ConsumerVerifier",
    "ExpiredToken",
    "InvalidToken",
]

CONSUMER_HEADER = "x-meshgate-consumer"
DEFAULT_TTL = 60.0
# Anything longer is refused before it is parsed: a real token is about 2 KB.
MAX_TOKEN_BYTES = 8192
MAX_CHAIN = 4
# Clock skew allowed between the gateway's host and the sidecar's.
LEEWAY = 5.0
# The longest lifetime a token may claim (the gateway's ttl is at most this).
MAX_LIFETIME = 3600.0
TOKEN_TYPE = "meshgate-consumer+jwt"
_MAX_CLAIM = 256


class InvalidToken(Exception):
    """A token that does not verify: forged, malformed, or not signed by an edge gateway."""


class ExpiredToken(InvalidToken):
    """A token an edge gateway did sign, past its lifetime."""


@dataclass(frozen=True, slots=True)
class Consumer:
    """The API consumer a request comes from, as the edge gateway authenticated it."""

    product: str
    application: str
    application_name: str
    account: str
    plan: str
    expires: float
    issuer: str = ""

    def claims(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "application": {"id": self.application, "name": self.application_name},
            "account": self.account,
            "plan": self.plan,
        }


def _algorithm(key: object) -> str:
    """The JWS algorithm a key signs with."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        algorithms = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        algorithm = algorithms.get(key.curve.name)
        if algorithm is None:
            raise InvalidToken(f"an EC key on curve {key.curve.name} cannot sign a JWT")
        return algorithm
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise InvalidToken(f"a {type(key).__name__} cannot sign a JWT")


class ConsumerSigner:
    """The edge gateway's side: a token per consumer, signed again at half its life."""

    def __init__(
        self, identity: Identity, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.time
    ) -> None:
        if not 1 <= ttl <= MAX_LIFETIME:
            raise ValueError(f"the consumer token's ttl must be 1 to {MAX_LIFETIME:.0f} seconds")
        self.identity = identity
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[tuple[str, str, str, str, str], tuple[bytes, float]] = {}
        self._load(identity)
        identity.subscribe(self._load)

    def _load(self, identity: Identity) -> None:
        material = identity.material
        self._key = serialization.load_pem_private_key(material.key_pem, password=None)
        self._algorithm = _algorithm(self._key)
        chain = x509.load_pem_x509_certificates(material.chain_pem)
        self._x5c = [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain
        ]
        self._issuer = material.spiffe_id.uri
        # Tokens signed with the previous certificate: new ones from now on.
        self._cache = {}

    def token(self, product: str, application: str, name: str, account: str, plan: str) -> bytes:
        """The token for this consumer: the cached one until half its life has passed."""
        key = (product, application, name, account, plan)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        token = self.sign(Consumer(product, application, name, account, plan, now + self.ttl), now)
        cache = self._cache
        if len(cache) >= 65536:
            cache.clear()
        cache[key] = (token, now + self.ttl / 2)
        return token

    def sign(self, consumer: Consumer, now: float | None = None) -> bytes:
        """A new token for ``consumer``, valid from ``now`` until ``consumer.expires``."""
        now = self.clock() if now is None else now
        claims = {
            "iss": self._issuer,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(consumer.expires),
            **consumer.claims(),
        }
        encoded = jwt.encode(
            claims,
            self._key,  # type: ignore[arg-type]
            algorithm=self._algorithm,
            headers={"typ": TOKEN_TYPE, "x5c": self._x5c},
        )
        return encoded.encode("ascii")


class ConsumerVerifier:
    """A sidecar's side: tokens verified against its identity's trust bundle, and kept
    (at most ``max_cached``) until they expire."""

    def __init__(
        self,
        identity: Identity,
        clock: Callable[[], float] = time.time,
        max_cached: int = 10_000,
    ) -> None:
        self.identity = identity
        self.clock = clock
        self.max_cached = max_cached
        self._cache: dict[bytes, Consumer] = {}
        self._load(identity)
        identity.subscribe(self._load)

    def _load(self, identity: Identity) -> None:
        material = identity.material
        self._roots = Store(x509.load_pem_x509_certificates(material.bundle_pem))
        self.trust_domain = material.spiffe_id.trust_domain
        # Verified against the old bundle: verified again against the new one.
        self._cache = {}
        self._signers: dict[tuple[Any, ...], tuple[SpiffeId, Any, str, float]] = {}

    def cached(self, token: bytes) -> Consumer | None:
        """A token verified before and not expired yet, without verifying it again."""
        consumer = self._cache.get(token)
        if consumer is not None and self.clock() < consumer.expires + LEEWAY:
            return consumer
        return None

    def verify(self, token: bytes) -> Consumer:
        """The consumer a token names; :class:`ExpiredToken` or :class:`InvalidToken`."""
        now = self.clock()
        consumer = self._cache.get(token)
        if consumer is not None:
            if now < consumer.expires + LEEWAY:
                return consumer
            del self._cache[token]
            raise ExpiredToken("the consumer token has expired")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken(f"the consumer token is longer than {MAX_TOKEN_BYTES} bytes")
        consumer = self._verify(token, now)
        cache = self._cache
        if len(cache) >= self.max_cached:
            for old in [t for t, c in cache.items() if now >= c.expires + LEEWAY]:
                del cache[old]
            if len(cache) >= self.max_cached:
                cache.clear()
        cache[token] = consumer
        return consumer

    def _verify(self, token: bytes, now: float) -> Consumer:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from None
        signer, public_key, algorithm = self._signer(header.get("x5c"), now)
        if header.get("alg") != algorithm:
            raise InvalidToken(
                f"the token's alg {header.get('alg')!r} is not its key's {algorithm}"
            )
        try:
            claims = jwt.decode(
                token,
                public_key,  # type: ignore[arg-type]
                algorithms=[algorithm],
                issuer=signer.uri,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise ExpiredToken("the consumer token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(f"the consumer token does not verify: {exc}") from None
        return _consumer(claims, signer.uri)

    def _signer(self, x5c: object, now: float) -> tuple[SpiffeId, Any, str]:
        """The gateway an ``x5c`` chain proves, its key and algorithm. A gateway signs every
        consumer's token with one chain: it is verified once, then kept until its leaf
        expires (or the bundle changes), so a new token costs one signature check."""
        key = tuple(x5c) if isinstance(x5c, list) and len(x5c) <= MAX_CHAIN else None
        known = self._signers.get(key) if key is not None else None
        if known is not None and now < known[3]:
            return known[0], known[1], known[2]
        leaf, intermediates = _chain(x5c)
        try:
            verifier = (
                PolicyBuilder()
                .store(self._roots)
                .time(_utc(now))
                .max_chain_depth(MAX_CHAIN)
                .build_client_verifier()
            )
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise InvalidToken(f"the signer's certificate is not trusted: {exc}") from None
        uris = [
            s.value
            for s in verified.subjects or ()
            if isinstance(s, x509.UniformResourceIdentifier)
        ]
        if len(uris) != 1:
            raise InvalidToken("the signer's certificate names no single SPIFFE ID")
        try:
            signer = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise InvalidToken(str(exc)) from None
        if not signer.is_gateway or signer.trust_domain != self.trust_domain:
            raise InvalidToken(
                f"signed by {signer.uri}, not an edge gateway of {self.trust_domain}"
            )
        public_key = leaf.public_key()
        algorithm = _algorithm(public_key)
        until = min(c.not_valid_after_utc.timestamp() for c in verified.chain)
        if key is not None:
            if len(self._signers) >= 64:
                self._signers.clear()
            self._signers[key] = (signer, public_key, algorithm, until)
        return signer, public_key, algorithm


def _utc(now: float) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(now, dt.UTC)


def _chain(x5c: object) -> tuple[x509.Certificate, list[x509.Certificate]]:
    if not isinstance(x5c, list) or not 1 <= len(x5c) <= MAX_CHAIN:
        raise InvalidToken(f"the token's x5c header must list 1 to {MAX_CHAIN} certificates")
    certificates = []
    for item in x5c:
        if not isinstance(item, str) or len(item) > MAX_TOKEN_BYTES:
            raise InvalidToken("an x5c entry is not a base64 certificate")
        try:
            certificates.append(
                x509.load_der_x509_certificate(base64.b64decode(item, validate=True))
            )
        except (ValueError, binascii.Error):
            raise InvalidToken("an x5c entry is not a base64 DER certificate") from None
    return certificates[0], certificates[1:]


def _text(name: str, value: object, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or len(value) > _MAX_CLAIM or (required and not value):
        raise InvalidToken(f"the token's {name} claim must be a string of 1 to {_MAX_CLAIM}")
    return value


def _consumer(claims: dict[str, Any], issuer: str) -> Consumer:
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise InvalidToken("the token's exp and iat must be numbers")
    if exp - iat > MAX_LIFETIME:
        raise InvalidToken(f"the token claims a lifetime above {MAX_LIFETIME:.0f} seconds")
    application = claims.get("application")
    if not isinstance(application, dict):
        raise InvalidToken("the token's application claim must be an object {id, name}")
    return Consumer(
        product=_text("product", claims.get("product")),
        application=_text("application.id", application.get("id")),
        application_name=_text("application.name", application.get("name"), False),
        account=_text("account", claims.get("account"), False),
        plan=_text("plan", claims.get("plan")),
        expires=float(exp),
        issuer=issuer,
    )
