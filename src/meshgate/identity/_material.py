"""Identity material and the TLS contexts made of it."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshgate.config.identity import SpiffeId

__all__ = ["Identity", "IdentityError", "Material", "peer_id"]


class IdentityError(Exception):
    """Material that cannot serve as a workload identity; the message says why."""


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def peer_id(der: bytes | None) -> SpiffeId | None:
    """The SPIFFE ID of a certificate the TLS handshake already verified (DER), or None
    when it names none or more than one."""
    if not der:
        return None
    try:
        uris = _uri_sans(x509.load_der_x509_certificate(der))
    except ValueError:
        return None
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Material:
    """One issued identity, checked: the leaf names one SPIFFE ID, the key is the leaf's."""

    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    spiffe_id: SpiffeId
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> Material:
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise IdentityError(f"the certificate chain is not PEM certificates ({exc})") from None
        try:
            roots = x509.load_pem_x509_certificates(bundle_pem)
        except ValueError as exc:
            raise IdentityError(f"the trust bundle is not PEM certificates ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"the private key is not an unencrypted PEM key ({exc})") from None
        leaf = chain[0]
        if not roots:
            raise IdentityError("the trust bundle holds no certificate")
        if key.public_key().public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise IdentityError("the private key is not the certificate's")
        uris = _uri_sans(leaf)
        if len(uris) != 1:
            raise IdentityError(f"the certificate names {len(uris)} URIs, not one SPIFFE ID")
        try:
            spiffe = SpiffeId.parse(uris[0])
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        return cls(
            chain_pem,
            key_pem,
            bundle_pem,
            spiffe,
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
        )

    def lifetime_left(self, now: dt.datetime | None = None) -> float:
        """Seconds until the leaf expires (negative once it has)."""
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds()


class Identity:
    """The current identity of this process and the TLS contexts made from it.

    Contexts are made once per material: ``server_context()`` (TLS 1.3, a client
    certificate required and verified against the bundle) for mTLS listeners,
    ``client_context()`` (TLS 1.3, the server verified against the bundle, this identity
    presented) for connections to them. Host names are not checked: the caller checks the
    peer's SPIFFE ID (:func:`peer_id`) against the service it meant to reach. The files the
    ``ssl`` module needs live in a private directory (0700) that :meth:`close` removes.
    """

    def __init__(self, material: Material, directory: str | os.PathLike[str] | None = None) -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="meshgate-identity-"))
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._listeners: list[Callable[[Identity], None]] = []
        self.generation = 0
        self.material = material
        self._server: ssl.SSLContext | None = None
        self._clients: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._write(material)

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.material.spiffe_id

    def _write(self, material: Material) -> None:
        self.generation += 1
        for name, data in (
            ("chain.pem", material.chain_pem),
            ("key.pem", material.key_pem),
            ("bundle.pem", material.bundle_pem),
        ):
            tmp = self.directory / f".{name}.{self.generation}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.directory / name)
        self._server = None
        self._clients = {}

    def update(self, material: Material) -> None:
        """A renewed certificate or a new bundle: new connections use it from now on."""
        self.material = material
        self._write(material)
        for listener in list(self._listeners):
            listener(self)

    def subscribe(self, listener: Callable[[Identity], None]) -> None:
        self._listeners.append(listener)

    @property
    def files(self) -> tuple[str, str, str]:
        """Paths of the chain, the key and the bundle as they stand now."""
        d = self.directory
        return str(d / "chain.pem"), str(d / "key.pem"), str(d / "bundle.pem")

    def server_context(self) -> ssl.SSLContext:
        if self._server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._load(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
            # A client offering h2 (an http2 service's pool) gets it; one offering nothing
            # speaks HTTP/1.1.
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            self._server = ctx
        return self._server

    def client_context(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """``alpn``: the protocols offered (``("h2",)`` for an HTTP/2 pool), none if empty."""
        ctx = self._clients.get(alpn)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            self._load(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._clients[alpn] = ctx
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        chain, key, _ = self.files
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(chain, key)
        ctx.load_verify_locations(cadata=self.material.bundle_pem.decode("ascii"))

    def close(self) -> None:
        if self._own_dir:
            for child in self.directory.iterdir():
                child.unlink(missing_ok=True)
            self.directory.rmdir()
