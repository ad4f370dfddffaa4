"""Mutual TLS between sidecars: the inbound port that takes both kinds of caller, and the
pools that speak TLS to instances whose sidecar does.

Inbound, one port serves mutual TLS and plaintext: each new connection's first byte is
peeked at (a TLS handshake record starts with 0x16), never consumed, and the socket is then
handed to the event loop as a native transport, TLS or not (:class:`InboundAcceptor`). A
TLS caller must present a certificate that chains to the trust bundle (TLS 1.3) and names
a SPIFFE ID of this trust domain and environment; the service's mode (Istio's
PeerAuthentication) says which kinds it takes: ``strict`` answers plaintext requests 403
(problem+json "mutual TLS required"), ``disable`` closes TLS connections.

Outbound, a pool to an instance the registry says speaks mutual TLS connects with the
identity's client context, then checks that the server is exactly
``spiffe://<trust domain>/ns/<env>/sa/<service>``: anything else is a connect failure (503).
The TLS context is chosen per new connection, so a renewed identity serves new connections
while open ones keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshgate.config.identity import SpiffeId
from meshgate.proxy import Exchange, Headers, Response, UpstreamError, UpstreamPool, problem

if TYPE_CHECKING:
    from meshgate.identity import Identity
    from meshgate.mesh._metrics import MeshMetrics
    from meshgate.proxy._upstream import UpstreamConnection

__all__ = [
    "MUTUAL_TLS",
    "PLAINTEXT",
    "InboundAcceptor",
    "MtlsPool",
    "PeerCheck",
    "RequireMtls",
    "peer_identity",
]

log = logging.getLogger("meshgate.mesh.mtls")

# Istio's connection_security_policy label values.
MUTUAL_TLS = "mutual_tls"
PLAINTEXT = "none"
_TLS_HANDSHAKE = 0x16


def peer_identity(exchange: Exchange) -> SpiffeId | None:
    """The SPIFFE ID of the workload that called over mutual TLS, as its verified certificate
    names it (the inbound port already checked it is of this trust domain and environment);
    None for a plaintext caller. What authorization and metrics use as the caller."""
    tls = exchange.request.tls
    if tls is None or tls.peer is None:
        return None
    cache = tls.peer.__dict__
    if "spiffe_id" not in cache:
        from meshgate.identity import peer_id

        cache["spiffe_id"] = peer_id(tls.peer.der)
    spiffe: SpiffeId | None = cache["spiffe_id"]
    return spiffe


def _peer_of(ssl_object: ssl.SSLObject | None) -> SpiffeId | None:
    """The SPIFFE ID a verified peer certificate names (its one URI SAN), read from what the
    handshake already decoded; None when it names none or more than one."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    names: Any = cert.get("subjectAltName", ())
    uris = [value for kind, value in names if kind == "URI"]
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(str(uris[0]))
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """A failed handshake's reason, as a metric label (a short fixed set)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "").lower()
        if "expired" in message:
            return "expired"
        if "not yet valid" in message:
            return "not-yet-valid"
        return "untrusted"
    if isinstance(exc, ssl.SSLError):
        text = f"{exc.reason or ''} {exc}".upper()
        if "EXPIRED" in text:
            return "expired"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
            return "no-certificate"
        if "UNKNOWN_CA" in text or "VERIFY_FAILED" in text or "BAD_CERTIFICATE" in text:
            return "untrusted"
        if "VERSION" in text:
            return "protocol-version"
        return "handshake"
    return "reset"


class _Verified(asyncio.Protocol):
    """The first moment of an inbound mutual TLS connection: the handshake verified the
    certificate's chain; the SPIFFE ID it names must be of this trust domain and environment.
    Hands the transport to the HTTP engine, or aborts it, before any byte is read."""

    def __init__(self, acceptor: InboundAcceptor, identity: Identity) -> None:
        self.acceptor = acceptor
        self.identity = identity

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        acceptor = self.acceptor
        peer = _peer_of(transport.get_extra_info("ssl_object"))
        own = self.identity.spiffe_id
        reason = None
        if peer is None:
            reason = "no-spiffe-id"
        elif peer.trust_domain != own.trust_domain:
            reason = "trust-domain"
        elif peer.env != own.env:
            reason = "environment"
        if reason is not None:
            acceptor.refused("inbound", reason, f"a caller named {peer or 'no SPIFFE ID'}")
            transport.abort()  # type: ignore[attr-defined]
            return
        acceptor.metrics.mtls_handshakes.labels("inbound").inc()
        acceptor.metrics.inbound_connections.labels(MUTUAL_TLS).inc()
        protocol = acceptor.serve()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: handed over or aborted first
        pass


class InboundAcceptor:
    """Accepts the inbound port's connections itself and serves each as its first byte says.

    ``mode`` and ``identity`` are read per connection (a new configuration or a renewed
    certificate applies to the next one); ``serve`` makes the engine's protocol, ``refuse``
    the one that answers plaintext callers of a strict service.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        mode: Callable[[], str],
        identity: Callable[[], Identity | None],
        serve: Callable[[], asyncio.Protocol],
        refuse: Callable[[], asyncio.Protocol],
        metrics: MeshMetrics,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.sock = sock
        self.mode = mode
        self.identity = identity
        self.serve = serve
        self.refuse = refuse
        self.metrics = metrics
        self.handshake_timeout = handshake_timeout
        self.loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()
        self._accepting = self.loop.create_task(self._accept())
        self._warned: set[str] = set()

    def close(self) -> None:
        """Stop accepting (the connections being served go on)."""
        self._accepting.cancel()
        for task in list(self._pending):
            task.cancel()
        self.sock.close()

    def refused(self, direction: str, reason: str, what: str) -> None:
        self.metrics.mtls_failures.labels(direction, reason).inc()
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("mutual TLS refused (%s): %s", reason, what)

    async def _accept(self) -> None:
        loop = self.loop
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                # Out of file descriptors, say: wait rather than spin.
                log.warning("inbound: cannot accept: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _first_byte(self, conn: socket.socket) -> asyncio.Future[bytes]:
        loop = self.loop
        fd = conn.fileno()
        waiter: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError as exc:
                if not waiter.done():
                    waiter.set_exception(exc)
                return
            if not waiter.done():
                waiter.set_result(data)

        loop.add_reader(fd, readable)
        waiter.add_done_callback(lambda _: loop.remove_reader(fd))
        return waiter

    async def _serve(self, conn: socket.socket) -> None:
        loop = self.loop
        try:
            first = await asyncio.wait_for(self._first_byte(conn), self.handshake_timeout)
        except (OSError, TimeoutError):
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()  # the listener closes: so does a connection that sent nothing yet
            raise
        if not first:
            conn.close()  # closed before a byte
            return
        mode = self.mode()
        identity = self.identity()
        if first[0] != _TLS_HANDSHAKE:
            if mode == "strict":
                self.refused("inbound", "plaintext", "a plaintext caller of a strict service")
                factory = self.refuse
            else:
                self.metrics.inbound_connections.labels(PLAINTEXT).inc()
                factory = self.serve
            try:
                await loop.connect_accepted_socket(factory, conn)
            except OSError:
                conn.close()
            return
        if mode == "disable" or identity is None:
            reason = "disabled" if mode == "disable" else "no-identity"
            self.refused("inbound", reason, "a TLS caller, and this sidecar takes plaintext only")
            conn.close()
            return
        try:
            await loop.connect_accepted_socket(
                lambda: _Verified(self, identity),
                conn,
                ssl=identity.server_context(),
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self.refused("inbound", _reason(exc), f"the handshake failed: {exc}")
            with contextlib.suppress(OSError):
                conn.close()


class RequireMtls:
    """The handler that answers a plaintext caller of a strict service (served by a server
    marked draining, so that the connection closes after the answer)."""

    def __init__(self, service: str) -> None:
        self.service = service

    def handle(self, exchange: Exchange) -> Response:
        return problem(
            403,
            "Forbidden",
            f"mutual TLS required: service {self.service!r} takes only mutual TLS (mode "
            "strict); call it through a sidecar that has an identity",
        )

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


class PeerCheck:
    """What a pool to one instance needs to choose TLS per new connection and check who
    answered: the mesh (identity, modes, which instances speak mutual TLS), the service, the
    instance's address."""

    __slots__ = ("mesh", "service", "key", "alpn")

    def __init__(self, mesh: Any, service: str, key: tuple[str, int], alpn: tuple[str, ...]):
        self.mesh = mesh
        self.service = service
        self.key = key
        self.alpn = alpn

    def context(self) -> ssl.SSLContext | None:
        """The client context for a new connection, None for plaintext."""
        mesh = self.mesh
        identity: Identity | None = mesh.identity
        if identity is None or self.key not in mesh.mtls_instances.get(self.service, ()):
            return None
        runtime = mesh.services.get(self.service)
        if runtime is not None and runtime.config.mtls.mode == "disable":
            return None
        return identity.client_context(self.alpn)

    def failed(self, error: UpstreamError) -> None:
        message = str(error)
        if message.startswith("the TLS"):
            reason = "expired" if "expired" in message else "handshake"
        elif "took longer" in message:
            reason = "timeout"
        else:
            return  # not reached at all: not a TLS failure
        self.mesh.metrics.mtls_failures.labels("outbound", reason).inc()

    def verify(self, transport: asyncio.BaseTransport | None) -> None:
        """Raise a connect failure (503) unless the server is the service's workload."""
        mesh = self.mesh
        own = mesh.identity.spiffe_id
        peer = _peer_of(transport.get_extra_info("ssl_object") if transport is not None else None)
        expected = SpiffeId(own.trust_domain, own.env, self.service)
        if peer == expected:
            mesh.metrics.mtls_handshakes.labels("outbound").inc()
            return
        mesh.metrics.mtls_failures.labels("outbound", "peer-identity").inc()
        address = f"{self.key[0]}:{self.key[1]}"
        got = peer.uri if peer is not None else "no SPIFFE ID"
        logged = (address, got)
        if logged not in mesh.mtls_logged and len(mesh.mtls_logged) < 1024:
            mesh.mtls_logged.add(logged)
            log.error(
                "instance %s of %s answered as %s, not %s: connection refused",
                address,
                self.service,
                got,
                expected.uri,
            )
        raise PeerMismatch(
            f"the TLS peer {address} is {got}, not {expected.uri} (service {self.service!r})"
        )


class PeerMismatch(UpstreamError):
    """The instance answered with another workload's certificate: a connect failure."""

    status = 503


class MtlsPool(UpstreamPool):
    """HTTP/1.1 connections to an instance: mutual TLS when it speaks it, checked."""

    __slots__ = ("peer",)

    def __init__(self, *args: Any, peer: PeerCheck, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer = peer

    async def connect(self) -> UpstreamConnection:
        peer = self.peer
        self.tls = tls = peer.context()
        try:
            conn = await super().connect()
        except UpstreamError as exc:
            if tls is not None:
                peer.failed(exc)
            raise
        if tls is not None:
            try:
                peer.verify(conn.transport)
            except PeerMismatch:
                conn.abort()
                raise
        return conn
