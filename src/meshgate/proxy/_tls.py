"""TLS for listeners and upstream pools: contexts, certificates chosen by SNI, reloads.

TLS is a property of a listener (:class:`ServerTls`) or of a pool
(:func:`client_context`), never a code path of its own: the HTTP protocols run on
whatever transport they are given. A listener's context picks, for every handshake,
the certificate whose names match the client's server name; a reload swaps the
per-certificate contexts for new connections while open ones keep theirs.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509


__all__ = [
    "ALPN",
    "CertificateFiles",
    "PeerCertificate",
    "ServerTls",
    "TlsError",
    "TlsInfo",
    "client_context",
    "subject_key",
]

# Mozilla's "intermediate" TLS 1.2 suites: forward secrecy and AEAD only. TLS 1.3's
# suites are all modern and are not narrowed.
_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# What a TLS listener offers by ALPN: the protocols the engine serves.
ALPN: tuple[str, ...] = ("h2", "http/1.1")
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """One certificate of a listener: PEM files, and host names beyond the certificate's own
    (its subject alternative names are always served)."""

    cert: str
    key: str
    name: str = ""
    hosts: tuple[str, ...] = ()


class _ServerSSLObject(ssl.SSLObject):
    """Keeps the server name the client asked for (SNI) and the listener, for the
    connection's TLS info."""

    server_name: str | None = None
    listener: ServerTls | None = None


def _stamp(paths: Iterable[str | None]) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0, 0))
        else:
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _dns_names(cert_file: str) -> list[str]:
    from cryptography import x509

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise TlsError(f"{cert_file}: not a readable PEM certificate ({exc})") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in sans.get_values_for_type(x509.DNSName)]


class ServerTls:
    """The TLS side of a listener: one context per certificate, chosen by SNI.

    ``context`` is what the listening socket is created with; it holds no certificate of
    its own that matters: its SNI callback moves every handshake onto the context of the
    certificate that matches (the first certificate when none does, or without SNI).
    Session tickets are sealed with the listener context's keys, so resumption survives
    certificate reloads.
    """

    def __init__(
        self,
        certificates: Sequence[CertificateFiles],
        *,
        client_ca: str | None = None,
        client_auth: str = "none",
        min_version: str = "1.2",
        alpn: Sequence[str] = ALPN,
    ) -> None:
        if not certificates:
            raise TlsError("a TLS listener needs at least one certificate")
        if client_auth not in _CLIENT_AUTH:
            raise TlsError(f"client_auth must be one of {', '.join(_CLIENT_AUTH)}")
        if client_auth != "none" and client_ca is None:
            raise TlsError("client certificates need client_ca, the CA bundle that signs them")
        self.client_ca = client_ca
        self.client_auth = client_auth
        self.min_version_name = min_version
        self.min_version = _VERSIONS.get(min_version)
        if self.min_version is None:
            raise TlsError("min_version must be 1.2 or 1.3")
        self.alpn = list(alpn)
        self.reloads = 0
        # When the trusted client CAs last changed: a session resumed from before then
        # proves no client certificate (it was verified against CAs no longer trusted).
        self.trust_changed_at = 0.0
        self._certificates: tuple[CertificateFiles, ...] = ()
        self._stamps: tuple[tuple[int, int, int, int], ...] = ()
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        self._default: ssl.SSLContext | None = None
        self._load(tuple(certificates))
        assert self._default is not None
        self.context: ssl.SSLContext = self._new_context()
        first = certificates[0]
        self.context.load_cert_chain(first.cert, first.key)
        self.context.sni_callback = self._choose
        self.context.sslobject_class = _ServerSSLObject

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version  # type: ignore[assignment]
        ctx.set_ciphers(_TLS12_CIPHERS)
        ctx.set_alpn_protocols(self.alpn)
        # No renegotiation (a CPU sink for attackers); the server picks the cipher suite.
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.options |= ssl.OP_NO_COMPRESSION
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"{self.client_ca}: not a readable PEM CA bundle ({exc})") from None
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth]
        return ctx

    def _load(self, certificates: tuple[CertificateFiles, ...]) -> None:
        # Stamped before reading: a file replaced while it is read is read again next time.
        stamps = _stamp(self._files(certificates))
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        default: ssl.SSLContext | None = None
        for entry in certificates:
            ctx = self._new_context()
            try:
                ctx.load_cert_chain(entry.cert, entry.key)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(
                    f"{entry.cert} / {entry.key}: cannot load the certificate and key ({exc})"
                ) from None
            if default is None:
                default = ctx
            for host in [*_dns_names(entry.cert), *(h.lower() for h in entry.hosts)]:
                if host.startswith("*."):
                    wildcard.setdefault(host[2:], ctx)
                elif host != "*":
                    exact.setdefault(host, ctx)
        # One assignment each, all built first: a handshake sees the old set or the new.
        self._exact, self._wildcard, self._default = exact, wildcard, default
        self._certificates = certificates
        self._stamps = stamps

    def _files(self, certificates: Iterable[CertificateFiles]) -> list[str | None]:
        files: list[str | None] = [self.client_ca]
        for entry in certificates:
            files += (entry.cert, entry.key)
        return files

    def _choose(self, conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = self._default
        if server_name:
            name = server_name.lower()
            found = self._exact.get(name)
            if found is None:
                _, dot, parent = name.partition(".")
                found = self._wildcard.get(parent) if dot else None
            if found is not None:
                ctx = found
            conn.server_name = name  # type: ignore[attr-defined]
        conn.listener = self  # type: ignore[attr-defined]
        conn.context = ctx  # type: ignore[assignment]

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context a handshake for ``server_name`` gets (for tests and diagnostics)."""
        probe = _Probe()
        self._choose(probe, server_name, self.context)  # type: ignore[arg-type]
        assert probe.context is not None
        return probe.context

    def changed(self) -> bool:
        """Whether a certificate, key or CA file changed on disk since it was loaded."""
        return _stamp(self._files(self._certificates)) != self._stamps

    def reload(
        self,
        certificates: Sequence[CertificateFiles] | None = None,
        client_ca: str | None | bool = False,
    ) -> None:
        """Read the files again (or load ``certificates``, and ``client_ca`` when given):
        new handshakes get the new contexts, open connections keep theirs. Raises TlsError
        and keeps the old set when a file cannot be used."""
        old_ca, old_stamp = self.client_ca, _stamp([self.client_ca])
        if client_ca is not False:
            if client_ca is None and self.client_auth != "none":
                raise TlsError("client certificates need client_ca")
            self.client_ca = client_ca  # type: ignore[assignment]
        try:
            self._load(tuple(certificates) if certificates is not None else self._certificates)
        except TlsError:
            self.client_ca = old_ca
            raise
        if self.client_ca != old_ca or _stamp([self.client_ca]) != old_stamp:
            self.trust_changed_at = time.time()
        self.reloads += 1


class _Probe:
    context: ssl.SSLContext | None = None
    server_name: str | None = None


def subject_key(subject: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The relative names of a subject as written (``CN=app1, O=Acme``), in that order and
    reversed (RFC 4514 writes the last name first, ``openssl x509 -subject`` the first):
    a certificate matches when its :attr:`PeerCertificate.subject_key` is either."""
    names = []
    for rdn in re.split(r"(?<!\\),", subject):
        values = []
        for part in re.split(r"(?<!\\)\+", rdn):
            name, _, value = part.partition("=")
            value = value.strip().replace("\\,", ",").replace("\\+", "+")
            values.append(f"{name.strip().upper()}={value}")
        names.append("+".join(sorted(values)))
    return tuple(names), tuple(reversed(names))


class PeerCertificate:
    """The client certificate a TLS listener verified, parsed only when asked."""

    __slots__ = ("der", "__dict__")

    def __init__(self, der: bytes) -> None:
        self.der = der

    @cached_property
    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the DER certificate (what ``openssl x509 -fingerprint``
        prints, without colons)."""
        return hashlib.sha256(self.der).hexdigest()

    @cached_property
    def _cert(self) -> x509.Certificate:
        from cryptography import x509

        return x509.load_der_x509_certificate(self.der)

    @cached_property
    def subject(self) -> str:
        """The subject as an RFC 4514 string, e.g. ``CN=app1,O=Acme``."""
        return self._cert.subject.rfc4514_string()

    @cached_property
    def subject_key(self) -> tuple[str, ...]:
        """The subject's relative names in certificate order, each ``TYPE=value`` (several
        values of one name joined by ``+``): what :func:`subject_key` makes of a subject
        written either way round, with any spacing."""
        return tuple(
            "+".join(sorted(f"{a.rfc4514_attribute_name.upper()}={a.value!s}" for a in rdn))
            for rdn in self._cert.subject.rdns
        )

    @cached_property
    def common_name(self) -> str | None:
        from cryptography.x509.oid import NameOID

        names = self._cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    @cached_property
    def sans(self) -> tuple[str, ...]:
        """DNS names, URIs (SPIFFE IDs), e-mail addresses and IP addresses, as text."""
        from cryptography import x509

        try:
            ext = self._cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return ()
        values: list[str] = []
        for kind in (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name):
            values += ext.value.get_values_for_type(kind)
        values += [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]
        return tuple(values)


@dataclass(slots=True)
class TlsInfo:
    """What a TLS connection negotiated; shared by the requests on that connection."""

    version: str
    cipher: str
    alpn: str | None
    server_name: str | None
    peer: PeerCertificate | None = field(default=None)

    @classmethod
    def of(cls, ssl_object: ssl.SSLObject) -> TlsInfo:
        der = ssl_object.getpeercert(binary_form=True)
        cipher = ssl_object.cipher()
        peer = PeerCertificate(der) if der else None
        listener: ServerTls | None = getattr(ssl_object, "listener", None)
        if peer is not None and listener is not None and ssl_object.session_reused:
            session = ssl_object.session
            if session is None or session.time <= listener.trust_changed_at:
                peer = None  # verified before the trusted CAs changed: not any more
        return cls(
            ssl_object.version() or "",
            cipher[0] if cipher else "",
            ssl_object.selected_alpn_protocol(),
            getattr(ssl_object, "server_name", None),
            peer,
        )


_CLIENT_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext] = {}


def client_context(
    *,
    ca_file: str | None = None,
    verify: bool = True,
    cert: str | None = None,
    key: str | None = None,
    alpn: Sequence[str] | None = None,
) -> ssl.SSLContext:
    """A context for connections to upstreams: verified against ``ca_file`` or the system
    trust store, with a client certificate when given (upstream mutual TLS). One per
    distinct setting and file contents, shared by every pool that asks for it."""
    key_ = (ca_file, verify, cert, key, tuple(alpn or ()), _stamp((ca_file, cert, key)))
    ctx = _CLIENT_CONTEXTS.get(key_)
    if ctx is not None:
        return ctx
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{ca_file}: not a readable PEM CA bundle ({exc})") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"{cert}: cannot load the client certificate and key ({exc})") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if len(_CLIENT_CONTEXTS) > 256:
        _CLIENT_CONTEXTS.clear()
    _CLIENT_CONTEXTS[key_] = ctx
    return ctx
