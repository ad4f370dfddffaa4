"""Listeners: a socket, its TLS (if any), and the protocol each connection speaks.

A :class:`Server` listens on one address and serves every connection with the current
handler. The protocol is chosen per connection: HTTP/1.1 (``_http1``) unless TLS
negotiated ``h2`` by ALPN or a cleartext client opened with the HTTP/2 preface (prior
knowledge, h2c), which go to ``_http2`` when the engine serves HTTP/2.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshgate.proxy._exchange import Handler
from meshgate.proxy._http1 import HttpProtocol
from meshgate.proxy._tls import ServerTls

__all__ = ["Server", "ServerSettings", "bind_socket"]


@dataclass(slots=True)
class ServerSettings:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    # The whole request body must arrive within this, however it trickles.
    body_total_timeout: float = 300.0
    # A client that reads nothing of its response for this long is cut off.
    send_timeout: float = 60.0
    max_header_size: int = 16384
    scheme: str = "http"
    # An upgraded connection (WebSocket) with no byte either way for this long is closed.
    tunnel_idle_timeout: float = 300.0
    # HTTP/2: h2 by ALPN on TLS listeners, h2c with prior knowledge on cleartext ones.
    http2: bool = True
    # Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    max_concurrent_streams: int = 100


class _Connection(Protocol):
    """A served connection, as the listener's shutdown sees it (HTTP/1.1 or HTTP/2)."""

    transport: asyncio.Transport | None

    def shutdown(self) -> None: ...


class Server:
    """Listens on one address and serves every connection with the current handler.

    ``handler`` may be replaced at any time (configuration reload): requests already
    started finish with the handler they began with. With ``tls``, connections are TLS
    (the handshake must finish within ``header_timeout``) and requests are ``https``.
    """

    __slots__ = (
        "handler",
        "settings",
        "loop",
        "connections",
        "draining",
        "min_span",
        "tls",
        "h2",
        "_server",
    )

    def __init__(
        self,
        handler: Handler,
        settings: ServerSettings | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        tls: ServerTls | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings = settings or ServerSettings()
        self.loop = loop or asyncio.get_event_loop()
        self.connections: set[_Connection] = set()
        self.draining = False
        self.tls = tls
        if tls is not None:
            settings.scheme = "https"
        # Makes the protocol of a connection that asked for HTTP/2: (server, transport,
        # bytes already read) -> None. None while the engine serves HTTP/1.1 only.
        self.h2: Callable[[Server, asyncio.Transport, bytes], None] | None = (
            _serve_h2 if settings.http2 else None
        )
        # The shortest timeout in use, upstream ones included as they are met: no
        # connection's timer is set further ahead than this (see HttpProtocol._arm).
        self.min_span = 0.0
        self.settings_changed()
        self._server: asyncio.Server | None = None

    def settings_changed(self) -> None:
        """Take changed ``settings`` timeouts into account (after a reload)."""
        settings = self.settings
        shortest = min(
            settings.header_timeout,
            settings.idle_timeout,
            settings.body_timeout,
            settings.send_timeout,
        )
        self.min_span = min(self.min_span, shortest) if self.min_span else shortest

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        sock = bind_socket(host, port, reuse_port=reuse_port)
        tls = self.tls
        if tls is None:
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self), sock=sock, backlog=2048
            )
        else:
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self),
                sock=sock,
                backlog=2048,
                ssl=tls.context,
                ssl_handshake_timeout=self.settings.header_timeout,
            )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within ``grace`` seconds."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + grace
        try:
            while self.connections and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            # Also when the shutdown itself is cancelled: no connection outlives it.
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()


def _serve_h2(server: Server, transport: asyncio.Transport, data: bytes) -> None:
    # Imported when a client first speaks HTTP/2: h2 costs megabytes a sidecar whose
    # apps speak HTTP/1.1 never needs.
    from meshgate.proxy._http2 import serve_h2

    serve_h2(server, transport, data)


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with ``reuse_port`` several processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
