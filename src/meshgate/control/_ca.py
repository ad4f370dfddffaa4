"""The mesh's certificate authority: its roots, the workload certificates it signs, renewals.

Two modes:

- *self-signed* (the default): a root (ECDSA P-256, 10 years) made on the first start and
  kept in the store with its private key encrypted (AES-GCM) under a key the store never
  sees: ``MESHGATE_CA_KEY`` (base64 of 32 bytes), the file ``MESHGATE_CA_KEY_FILE`` names,
  or a key file made (0600) in the control plane's data directory. A rotation makes a new
  root that signs from then on while the old one stays in the bundle, until it is retired.
- *intermediate*: the operator brings a CA certificate and key (``--ca-cert``/``--ca-key``)
  signed by their own root (``--ca-bundle``); that root is the bundle, nothing is stored.

Certificates are X.509-SVIDs: the one URI SAN is ``spiffe://<td>/ns/<env>/sa/<service>``,
server and client auth, not a CA. Rows are read from the store (cached a second), so a
rotation made through one replica reaches the others.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from meshgate.config.identity import RENEWAL_WINDOW, TRUST_DOMAIN, SpiffeId, renewal_proof
from meshgate.control._db import Database
from meshgate.control.models import CaAuthority, utcnow

__all__ = [
    "CaError",
    "CaSettings",
    "CertificateAuthority",
    "Issued",
    "Refused",
    "check_csr",
    "parse_csr",
]

log = logging.getLogger("meshgate.control.ca")

KEY_ENV = "MESHGATE_CA_KEY"
KEY_FILE_ENV = "MESHGATE_CA_KEY_FILE"
KEY_FILE_NAME = "ca.key"
ROOT_LIFETIME = dt.timedelta(days=3650)
# Roots and their keys are read again after this long: another replica may have rotated.
_CACHE_SECONDS = 1.0
_SEALED = "aesgcm:v1:"
_LOCK = 0x6D67CA  # pg_advisory_xact_lock key of the CA's changes


class CaError(Exception):
    """The CA cannot start or change as asked; the message is one line saying why."""


class Refused(Exception):
    """A certificate request refused: the HTTP status, a reason for the caller and a short
    code for the counts."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code


@dataclass
class CaSettings:
    trust_domain: str = TRUST_DOMAIN
    # Lifetime of a workload certificate, in seconds; renewed at half of it.
    cert_ttl: float = 86400.0
    # The key that encrypts the roots' private keys: base64 of 32 bytes, or a file holding it.
    key: str | None = None
    key_file: Path | None = None
    # An intermediate under the operator's root: its certificate (chain), key and the root.
    cert: Path | None = None
    cert_key: Path | None = None
    bundle: Path | None = None

    @classmethod
    def from_env(cls, **given: Any) -> CaSettings:
        """The settings given, with the key from the environment unless given."""
        settings = cls(**given)
        if settings.key is None:
            settings.key = os.environ.get(KEY_ENV) or None
        if settings.key_file is None and os.environ.get(KEY_FILE_ENV):
            settings.key_file = Path(os.environ[KEY_FILE_ENV])
        return settings


@dataclass(frozen=True)
class Issued:
    spiffe_id: SpiffeId
    chain_pem: str
    bundle_pem: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    renew_at: dt.datetime


@dataclass
class _Signer:
    cert: x509.Certificate
    key: Any
    # Sent after each leaf: an intermediate and what lies between it and the root (a root
    # signing itself sends nothing: the bundle has it).
    chain: list[x509.Certificate]


@dataclass
class _State:
    signer: _Signer
    roots: list[x509.Certificate]
    bundle_pem: str
    etag: str
    read_at: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _decode_key(value: str, source: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise CaError(
            f"{source} must hold 32 random bytes in base64 (make one with "
            "`head -c 32 /dev/urandom | base64`)"
        )
    return key


def _seal(key: bytes, private_key: Any, cert: x509.Certificate) -> str:
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    nonce = secrets.token_bytes(12)
    # Bound to its certificate: a sealed key cannot be moved to another row.
    sealed = AESGCM(key).encrypt(nonce, der, cert.fingerprint(hashes.SHA256()))
    return _SEALED + base64.b64encode(nonce + sealed).decode("ascii")


def _unseal(key: bytes, value: str, cert: x509.Certificate) -> Any:
    if not value.startswith(_SEALED):
        raise CaError("a CA key in the store is not in a format this version reads")
    raw = base64.b64decode(value[len(_SEALED) :])
    der = AESGCM(key).decrypt(raw[:12], raw[12:], cert.fingerprint(hashes.SHA256()))
    return serialization.load_der_private_key(der, password=None)


def _new_root(trust_domain: str) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"meshgate mesh CA {trust_domain} {now:%Y-%m-%d %H:%M:%S}"
            ),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def parse_csr(value: Any) -> x509.CertificateSigningRequest:
    """A PEM CSR whose signature verifies (the caller holds its key); :class:`Refused`
    422 otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise Refused(422, "csr: a PEM certificate signing request (a string) is required", "csr")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in value:
        raise Refused(
            422,
            "csr: not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)",
            "csr",
        )
    try:
        csr = x509.load_pem_x509_csr(value.encode("ascii", "replace"))
    except ValueError as exc:
        raise Refused(422, f"csr: cannot be read: {str(exc)[:200]}", "csr") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported algorithm cannot prove possession either
        valid = False
    if not valid:
        raise Refused(
            422, "csr: its signature does not verify (no proof of the key's possession)", "csr"
        )
    return csr


def check_csr(csr: x509.CertificateSigningRequest, spiffe: SpiffeId) -> None:
    """The CSR's key is strong enough and it asks for no name but ``spiffe``."""
    try:
        key = csr.public_key()
    except Exception as exc:
        raise Refused(422, f"csr: its public key cannot be read: {exc}", "weak_key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise Refused(
                422, f"csr: EC curve {key.curve.name} is not accepted (P-256 or P-384)", "weak_key"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 8192:
            raise Refused(
                422, f"csr: an RSA key of {key.key_size} bits (2048 to 8192 accepted)", "weak_key"
            )
    else:
        raise Refused(
            422,
            f"csr: a {type(key).__name__.removeprefix('_')} key is not accepted "
            "(EC P-256, P-384 or RSA of 2048 bits or more)",
            "weak_key",
        )
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise Refused(422, f"csr: its extensions cannot be read: {exc}", "csr") from None
    asked = [getattr(name, "value", str(name)) for name in sans]
    if [str(a) for a in asked] != [spiffe.uri]:
        raise Refused(
            403,
            f"the CSR asks for {', '.join(map(str, asked))[:300]} but this credential is for "
            f"{spiffe.uri} only (certificates name that one URI)",
            "wrong_name",
        )


class CertificateAuthority:
    """The CA of one control plane (process); thread-safe."""

    def __init__(self, db: Database, settings: CaSettings, data_dir: Path | None) -> None:
        self.db = db
        self.settings = settings
        self.data_dir = data_dir
        self.trust_domain = settings.trust_domain
        self.mode = "intermediate" if settings.cert is not None else "self-signed"
        self.refusals: Counter[str] = Counter()
        self.issued = 0
        self._key: bytes | None = None
        self._state: _State | None = None
        self._keys: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._operator: _State | None = None

    # Start

    def prepare(self) -> None:
        """Load the CA, making its root on the very first start; :class:`CaError` says why
        it cannot."""
        try:
            SpiffeId(self.trust_domain, "x", "x")
        except ValueError as exc:
            raise CaError(f"--trust-domain: {exc}") from None
        if self.settings.cert_ttl < 10:
            raise CaError("the certificate lifetime must be at least 10 seconds")
        if self.mode == "intermediate":
            self._operator = self._load_operator()
            return
        with self.db.writer() as session, session.begin():
            _lock(session)
            rows = session.scalars(select(CaAuthority).order_by(CaAuthority.id)).all()
            self._key = self._encryption_key(stored=bool(rows))
            if not rows:
                cert, key = _new_root(self.trust_domain)
                session.add(
                    CaAuthority(
                        state="active",
                        cert_pem=_pem(cert),
                        key_encrypted=_seal(self._key, key, cert),
                    )
                )
                log.info(
                    "made the mesh CA's root %s (%s)", _fingerprint(cert)[:16], self.trust_domain
                )
        self.state(fresh=True)

    def _encryption_key(self, stored: bool) -> bytes:
        s = self.settings
        if s.key:
            return _decode_key(s.key, KEY_ENV)
        if s.key_file is not None:
            try:
                return _decode_key(s.key_file.read_text(), f"the CA key file {s.key_file}")
            except OSError as exc:
                raise CaError(
                    f"cannot read the CA key file {s.key_file}: {exc.strerror or exc}"
                ) from None
        if self.data_dir is None:
            raise CaError(f"give the CA's key: {KEY_ENV} or {KEY_FILE_ENV}")
        path = self.data_dir / KEY_FILE_NAME
        if path.exists():
            try:
                return _decode_key(path.read_text(), f"the CA key file {path}")
            except OSError as exc:
                raise CaError(
                    f"cannot read the CA key file {path}: {exc.strerror or exc}"
                ) from None
        if stored:
            raise CaError(
                f"the store holds the mesh CA's encrypted root key but no key decrypts it: "
                f"give {KEY_ENV} or {KEY_FILE_ENV} (the key used before), or restore {path}"
            )
        key = secrets.token_bytes(32)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(base64.b64encode(key).decode("ascii") + "\n")
        except OSError as exc:
            raise CaError(f"cannot write the CA key file {path}: {exc.strerror or exc}") from None
        log.info(
            "the mesh CA's key encryption key is in %s (keep it with the store's backups)", path
        )
        return key

    def _load_operator(self) -> _State:
        s = self.settings
        assert s.cert is not None
        if s.cert_key is None:
            raise CaError("--ca-cert needs --ca-key (the CA certificate's private key)")

        def read(path: Path, what: str) -> bytes:
            try:
                return path.read_bytes()
            except OSError as exc:
                raise CaError(f"cannot read {what} {path}: {exc.strerror or exc}") from None

        try:
            chain = x509.load_pem_x509_certificates(read(s.cert, "the CA certificate"))
        except ValueError:
            raise CaError(f"--ca-cert {s.cert}: not PEM certificates") from None
        try:
            key = serialization.load_pem_private_key(read(s.cert_key, "the CA key"), None)
        except (ValueError, TypeError) as exc:
            raise CaError(f"--ca-key {s.cert_key}: not an unencrypted PEM key ({exc})") from None
        cert = chain[0]
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise CaError("--ca-key is not the key of --ca-cert")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CaError(f"--ca-cert {s.cert}: not a CA certificate (basicConstraints CA:TRUE)")
        if s.bundle is not None:
            try:
                roots = x509.load_pem_x509_certificates(read(s.bundle, "the CA bundle"))
            except ValueError:
                raise CaError(f"--ca-bundle {s.bundle}: not PEM certificates") from None
        elif chain[-1].issuer == chain[-1].subject:
            roots = [chain[-1]]
        else:
            raise CaError("give --ca-bundle: the root that signed --ca-cert")
        path = [c for c in chain if c not in roots]
        if not path or path[0] != cert:
            raise CaError("--ca-cert is itself a root in the bundle: give an intermediate")
        for child, parent in zip(path, [*path[1:], None], strict=True):
            issuers = [parent] if parent is not None else roots
            if not any(_issued_by(child, issuer) for issuer in issuers if issuer is not None):
                raise CaError(
                    f"--ca-cert: {child.subject.rfc4514_string()} is not signed by "
                    + ("the next certificate" if parent is not None else "a root of --ca-bundle")
                )
        now = dt.datetime.now(dt.UTC)
        if cert.not_valid_after_utc <= now:
            raise CaError(f"--ca-cert expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        bundle = "".join(_pem(r) for r in roots)
        return _State(
            _Signer(cert, key, path),
            roots,
            bundle,
            _etag(bundle),
            time.monotonic(),
            [_describe(r, "operator root") for r in roots] + [_describe(cert, "intermediate")],
        )

    # Reading

    def state(self, fresh: bool = False) -> _State:
        if self._operator is not None:
            return self._operator
        with self._lock:
            current = self._state
            if fresh or current is None or time.monotonic() - current.read_at > _CACHE_SECONDS:
                current = self._state = self._read()
            return current

    def _read(self) -> _State:
        assert self._key is not None
        with self.db.session() as session:
            rows = session.scalars(select(CaAuthority).order_by(CaAuthority.id)).all()
        trusted: list[x509.Certificate] = []
        signer = None
        described = []
        for row in rows:
            cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
            described.append({"id": row.id, **_describe(cert, row.state)})
            if row.state == "retired":
                continue
            trusted.append(cert)
            if row.state == "active":
                key = self._keys.get(row.id)
                if key is None:
                    try:
                        key = self._keys[row.id] = _unseal(self._key, row.key_encrypted, cert)
                    except InvalidTag:
                        raise CaError(
                            f"the mesh CA's root key in the store does not decrypt with the "
                            f"key given ({self._key_source()}): wrong key"
                        ) from None
                signer = _Signer(cert, key, [])
        if signer is None:
            raise CaError("the store holds no active CA root")
        # Newest root first: what a reader sees first is what signs.
        trusted.reverse()
        bundle = "".join(_pem(c) for c in trusted)
        return _State(signer, trusted, bundle, _etag(bundle), time.monotonic(), described)

    def _key_source(self) -> str:
        if self.settings.key:
            return KEY_ENV
        if self.settings.key_file is not None:
            return str(self.settings.key_file)
        return str((self.data_dir or Path()) / KEY_FILE_NAME)

    def bundle(self) -> tuple[str, str]:
        """The trust bundle (PEM) and its ETag."""
        state = self.state()
        return state.bundle_pem, state.etag

    def describe(self) -> dict[str, Any]:
        state = self.state()
        return {
            "trust_domain": self.trust_domain,
            "mode": self.mode,
            "certificate_ttl": self.settings.cert_ttl,
            "roots": state.rows,
            "bundle": state.bundle_pem,
            "bundle_etag": state.etag,
            "issued": self.issued,
            "refusals": dict(self.refusals),
        }

    # Issuing

    def issue(self, csr: x509.CertificateSigningRequest, spiffe: SpiffeId) -> Issued:
        """Sign ``csr`` (checked already) as ``spiffe``."""
        state = self.state()
        signer = state.signer
        now = dt.datetime.now(dt.UTC)
        ttl = dt.timedelta(seconds=self.settings.cert_ttl)
        not_before = now - min(dt.timedelta(seconds=60), ttl / 20)
        not_after = min(now + ttl, signer.cert.not_valid_after_utc)
        public = csr.public_key()
        is_rsa = isinstance(public, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # The subject is empty: the SAN is the identity, and critical (RFC 5280 4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe.uri)]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        algorithm = None if isinstance(signer.key, _ed_keys()) else hashes.SHA256()
        leaf = builder.sign(signer.key, algorithm)
        self.issued += 1
        renew_at = now + (not_after - now) / 2
        log.info(
            "issued %s serial %x until %s", spiffe.uri, leaf.serial_number, f"{not_after:%H:%M:%S}"
        )
        return Issued(
            spiffe,
            _pem(leaf) + "".join(_pem(c) for c in signer.chain),
            state.bundle_pem,
            format(leaf.serial_number, "x"),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            renew_at,
        )

    def verify_current(
        self,
        chain_pem: Any,
        csr: x509.CertificateSigningRequest,
        timestamp: Any,
        signature: Any,
    ) -> SpiffeId:
        """The identity a renewal proves: ``chain_pem`` leads from a valid leaf to a root of
        the bundle, and ``signature`` over (``timestamp``, the CSR) verifies with the leaf's
        key. :class:`Refused` 401 says why not."""
        if not isinstance(chain_pem, str) or "-----BEGIN CERTIFICATE-----" not in chain_pem:
            raise Refused(
                401,
                "a bootstrap token (Authorization: Bearer) is required, or a renewal: the "
                "current certificate chain, a timestamp and a signature",
                "no_credential",
            )
        if isinstance(timestamp, bool) or not isinstance(timestamp, int) or abs(timestamp) > 2**40:
            raise Refused(401, "renewal: timestamp must be an integer (Unix seconds)", "renewal")
        if not isinstance(signature, str):
            raise Refused(401, "renewal: signature (base64) is required", "renewal")
        now = time.time()
        if abs(now - timestamp) > RENEWAL_WINDOW:
            raise Refused(
                401,
                f"renewal: the timestamp is more than {RENEWAL_WINDOW} s from the control "
                "plane's clock",
                "renewal",
            )
        try:
            chain = x509.load_pem_x509_certificates(chain_pem.encode("ascii", "replace"))
            proof = base64.b64decode(signature, validate=True)
        except (ValueError, binascii.Error):
            raise Refused(
                401, "renewal: the chain or the signature cannot be read", "renewal"
            ) from None
        if len(chain) > 8:
            raise Refused(401, "renewal: a chain of more than 8 certificates", "renewal")
        leaf = chain[0]
        moment = dt.datetime.now(dt.UTC)
        if leaf.not_valid_after_utc <= moment:
            raise Refused(
                401,
                f"renewal: the current certificate expired at {leaf.not_valid_after_utc:%H:%M:%S} "
                "UTC; "
                "get a new one with a bootstrap token",
                "expired",
            )
        if leaf.not_valid_before_utc > moment + dt.timedelta(minutes=5):
            raise Refused(401, "renewal: the current certificate is not valid yet", "renewal")
        if not self._chains(chain):
            raise Refused(
                401,
                "renewal: the current certificate does not chain to a root of the trust "
                "bundle (was its root retired?); get a new one with a bootstrap token",
                "untrusted",
            )
        uris = _uris(leaf)
        try:
            spiffe = SpiffeId.parse(uris[0]) if len(uris) == 1 else None
        except ValueError:
            spiffe = None
        if spiffe is None or spiffe.trust_domain != self.trust_domain:
            raise Refused(
                401,
                f"renewal: the current certificate names no identity of {self.trust_domain}",
                "untrusted",
            )
        message = renewal_proof(timestamp, csr.public_bytes(serialization.Encoding.DER))
        key = leaf.public_key()
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(proof, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(proof, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise InvalidSignature
        except InvalidSignature:
            raise Refused(
                401,
                "renewal: the signature does not verify with the current certificate's key",
                "renewal",
            ) from None
        return spiffe

    def _chains(self, chain: list[x509.Certificate]) -> bool:
        """Whether ``chain`` (leaf first) leads to a trusted root, every link valid now."""
        roots = self.state().roots
        now = dt.datetime.now(dt.UTC)
        current = chain[0]
        rest = chain[1:]
        for _ in range(len(chain) + 1):
            for root in roots:
                if _issued_by(current, root) and root.not_valid_after_utc > now:
                    return True
            nxt = next((c for c in rest if _issued_by(current, c)), None)
            if nxt is None or nxt.not_valid_after_utc <= now or not _is_ca(nxt):
                return False
            rest = [c for c in rest if c is not nxt]
            current = nxt
        return False

    # Rotation

    def rotate(self) -> dict[str, Any]:
        """A new root signs from now on; the active one stays trusted (``previous``)."""
        if self.mode == "intermediate":
            raise CaError(
                "the CA is an intermediate under your root: rotate it by restarting with a new "
                "--ca-cert and --ca-key"
            )
        assert self._key is not None
        with self.db.writer() as session, session.begin():
            _lock(session)
            rows = session.scalars(select(CaAuthority).where(CaAuthority.state != "retired")).all()
            if any(r.state == "previous" for r in rows):
                raise CaError(
                    "a rotation is under way: retire the previous root first "
                    "(POST /admin/api/ca/retire), once every workload has renewed"
                )
            for row in rows:
                row.state = "previous"
            cert, key = _new_root(self.trust_domain)
            session.add(
                CaAuthority(
                    state="active", cert_pem=_pem(cert), key_encrypted=_seal(self._key, key, cert)
                )
            )
        log.info("mesh CA rotation: the new root %s signs from now on", _fingerprint(cert)[:16])
        self.state(fresh=True)
        return _describe(cert, "active")

    def retire(self) -> list[dict[str, Any]]:
        """The previous root leaves the bundle: certificates it signed are trusted no more."""
        if self.mode == "intermediate":
            raise CaError("the CA is an intermediate under your root: there is no root to retire")
        with self.db.writer() as session, session.begin():
            _lock(session)
            rows = session.scalars(select(CaAuthority).where(CaAuthority.state == "previous")).all()
            if not rows:
                raise CaError("no rotation is under way: no previous root to retire")
            retired = []
            for row in rows:
                row.state = "retired"
                row.retired_at = utcnow()
                retired.append(
                    _describe(x509.load_pem_x509_certificate(row.cert_pem.encode()), "retired")
                )
        log.info("mesh CA rotation done: %d previous root(s) retired", len(retired))
        self.state(fresh=True)
        return retired


def _ed_keys() -> tuple[type, ...]:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    return (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def _describe(cert: x509.Certificate, state: str) -> dict[str, Any]:
    return {
        "state": state,
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": _fingerprint(cert),
    }


def _etag(bundle: str) -> str:
    return f'"bundle-{hashlib.sha256(bundle.encode()).hexdigest()[:16]}"'
