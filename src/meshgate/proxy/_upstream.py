"""Upstream connections: a pool of keep-alive HTTP/1.1 connections per backend address.

An :class:`UpstreamConnection` parses responses with httptools and pushes head, body and
end events to its current *sink* (the client side of an exchange). It never buffers a
body: flow control pauses the faster side (see ``pause_writing`` on both protocols).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import httptools

__all__ = [
    "Sink",
    "UpstreamBusy",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "open_connection",
]


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange: 502 by default."""

    status = 502


class UpstreamBusy(UpstreamError):
    """The pool holds as many connections as it may: 503, without waiting."""

    status = 503


class Sink(Protocol):
    """The client side of an exchange, fed by its upstream connection.

    Within one read from the upstream, ``upstream_head`` may hold the response head
    back so that it leaves with the first body bytes; the read ends with
    ``upstream_flush`` (head held, no body yet) or ``upstream_done``. A sink that
    forwards trailers also has ``upstream_trailers(fields)``: HTTP/2 upstreams call it
    before ``upstream_done`` (see ``_upstream_h2``).
    """

    def upstream_head(
        self, status: int, headers: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_flush(self) -> None: ...
    def upstream_done(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...
    def upstream_switched(
        self, headers: list[tuple[bytes, bytes]], protocol: bytes, rest: bytes
    ) -> None: ...


# Response body framing, as the upstream sent it.
FRAMING_NONE = 0  # no body (HEAD, 204, 304)
FRAMING_LENGTH = 1
FRAMING_CHUNKED = 2
FRAMING_CLOSE = 3  # delimited by the connection closing

# Never delivered to the sink: hop-by-hop fields (RFC 9110 7.6.1) and framing, which the
# engine regenerates, and X-Request-Id, since the gateway's own id is the one returned.
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
        b"x-request-id",
    }
)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


class _Desync(Exception):
    """Bytes after a complete response that belong to no request."""


class _Unasked(Exception):
    """A 101 to a request that asked for no upgrade."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "transport",
        "parser",
        "sink",
        "head_request",
        "_time",
        "_headers",
        "_length",
        "_chunked",
        "_nominated",
        "_status",
        "_skip",
        "_framing",
        "_done",
        "_held",
        "closed",
        "reused",
        "last_activity",
        "paused",
        "_upgrade",
        "_protocol",
        "_switched",
        "counted",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.head_request = False
        self._time = pool.loop.time
        self._headers: list[tuple[bytes, bytes]] = []
        self._length = False
        self._chunked = False
        # Field names a Connection header nominated as hop-by-hop (rare).
        self._nominated: set[bytes] | None = None
        self._status = 0
        self._skip = False
        self._framing = FRAMING_LENGTH
        self._done = False
        self._held = False
        self.closed = False
        self.reused = False
        self.last_activity = 0.0
        self.paused = False
        self._upgrade = False  # the request asked to switch protocols
        self._protocol = b""  # the upstream's Upgrade field
        self._switched = False  # it answered 101: what follows the head is not HTTP
        self.counted = False  # in the pool's count of open connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counted = True
        self.pool.open += 1

    def begin(self, sink: Sink, head_request: bool, upgrade: bool = False) -> None:
        """Attach the exchange that receives the next response; with ``upgrade`` the request
        asked to switch protocols, and a 101 hands the connection to the sink."""
        self.sink = sink
        self.head_request = head_request
        self._upgrade = upgrade
        self._protocol = b""
        self._done = False
        self._held = False
        self._status = 0
        self._headers = []
        self._length = self._chunked = False
        self._nominated = None
        if self.paused:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _reset_fields(self) -> None:
        # No on_message_begin callback (one Python call per response less): a response's
        # fields start afresh when a request begins (see begin), and after an interim one.
        self._headers = []
        self._length = False
        self._chunked = False
        self._nominated = None

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        """Several pieces in one write (a head and body chunks with their framing)."""
        assert self.transport is not None
        self.transport.writelines(parts)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._time()
        sink = self.sink
        if sink is None:
            # Bytes while idle: the upstream broke HTTP; never reuse this connection.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._switched:
                # Taken out of the pool's hands for good: the transport is the sink's now.
                self.sink = None
                self.closed = True
                self.pool.forget(self)
                # Still counted against the pool's cap: the tunnel uncounts it when it closes.
                sink.upstream_switched(self._headers, self._protocol, data[exc.args[0] :])
                return
            self.close()
            sink.upstream_lost(UpstreamError("the upstream switched protocols unasked"))
            return
        except httptools.HttpParserError as exc:
            self.close()
            if isinstance(exc.__context__, _Unasked):
                sink.upstream_lost(
                    UpstreamError(
                        "the upstream answered 101 Switching Protocols to a request that asked "
                        "for no upgrade, or without an Upgrade field"
                    )
                )
                return
            if not self._done:
                sink.upstream_lost(UpstreamError(f"invalid response from upstream: {exc}"))
                return
            # The response is complete; what followed it only costs the connection.
        # The end of the response is delivered after the parser returns, never from
        # inside it: the sink may reuse this connection for its next request at once.
        if self._done:
            self.sink = None
            if self.head_request:
                # llhttp cannot be told a response has no body; a HEAD response's parser
                # would wait for Content-Length bytes, so start afresh.
                self.parser = httptools.HttpResponseParser(self)
            sink.upstream_done()
        elif self._held:
            self._held = False
            sink.upstream_flush()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status:
            return  # a trailer, after the final head: dropped
        name = name.lower()
        if name in _RESPONSE_DROP:
            if name == b"transfer-encoding":
                if value.lower().endswith(b"chunked"):
                    self._chunked = True
            elif name == b"upgrade":
                self._protocol = value
            elif name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                tokens = {t.strip().lower() for t in value.split(b",")}
                self._nominated = (self._nominated or set()) | tokens
            return
        if name == b"content-length":
            self._length = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._done:
            raise _Desync
        parser = self.parser
        status = parser.get_status_code()
        if status == 101:
            if not self._upgrade or not self._protocol:
                raise _Unasked
            # The parser stops here (HttpParserUpgrade): data_received hands over the rest.
            self._switched = True
            self._headers = [(k, v) for k, v in self._headers if k not in (self._nominated or ())]
            return
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103) are not forwarded; the gateway
            # answers Expect itself.
            self._skip = True
            self._reset_fields()
            return
        headers = self._headers
        chunked, length, nominated = self._chunked, self._length, self._nominated
        self._skip = False
        self._status = status
        if self.head_request or status == 204 or status == 304:
            framing = FRAMING_NONE
        elif chunked:
            framing = FRAMING_CHUNKED
            if length:
                # RFC 9112 6.3: Transfer-Encoding overrides Content-Length.
                headers = [(k, v) for k, v in headers if k != b"content-length"]
        elif length:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        if nominated is not None:
            headers = [(k, v) for k, v in headers if k not in nominated]
        self._framing = framing
        keep_alive = framing != FRAMING_CLOSE and parser.should_keep_alive()
        sink = self.sink
        assert sink is not None
        self._held = True
        sink.upstream_head(status, headers, framing, keep_alive)
        if framing == FRAMING_NONE and self.head_request:
            self._done = True

    def on_body(self, body: bytes) -> None:
        if self._skip or self._done:
            return
        sink = self.sink
        if sink is not None:
            self._held = False
            sink.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        self._done = True

    def eof_received(self) -> bool | None:
        return None

    def uncount(self) -> None:
        """No longer one of the pool's open connections (closed, or its tunnel closed)."""
        if self.counted:
            self.counted = False
            self.pool.open -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self.uncount()
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if (
            exc is None
            and self._framing == FRAMING_CLOSE
            and self._status
            and not self._done
            and not self._skip
        ):
            self._done = True
            sink.upstream_done()
        else:
            sink.upstream_lost(
                UpstreamError("upstream closed the connection" if exc is None else str(exc))
            )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_activity = self._time()  # silence while paused was ours
            self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)


class _Endpoint(Protocol):
    """What :func:`open_connection` needs of a pool."""

    host: str
    port: int
    connect_timeout: float
    tls: ssl.SSLContext | None
    server_name: str
    loop: asyncio.AbstractEventLoop


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def open_connection(
    pool: _Endpoint, factory: Callable[[], _P]
) -> tuple[asyncio.Transport, _P]:
    """A connection to the pool's address, TLS as its context says, within its connect
    timeout; UpstreamError saying why not (a certificate that does not verify included)."""
    host, port = pool.host, pool.port
    tls = pool.tls
    try:
        if tls is None:
            opening = pool.loop.create_connection(factory, host, port)
        else:
            opening = pool.loop.create_connection(
                factory,
                host,
                port,
                ssl=tls,
                server_hostname=pool.server_name,
                ssl_handshake_timeout=pool.connect_timeout,
            )
        transport, protocol = await asyncio.wait_for(opening, pool.connect_timeout)
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamError(
            f"the TLS certificate of {host}:{port} does not verify "
            f"(as {pool.server_name}): {exc.verify_message or exc.reason}"
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamError(
            f"the TLS handshake with {host}:{port} failed: {exc.reason or exc}"
        ) from None
    except TimeoutError:
        raise UpstreamError(
            f"connecting to {host}:{port} took longer than {pool.connect_timeout}s"
        ) from None
    except OSError as exc:
        raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    return transport, protocol  # type: ignore[return-value]


class UpstreamPool:
    """Connections to one backend address, reused LIFO while they stay healthy.

    With ``tls`` (a client context) every connection is TLS, verified as the context
    says, with ``server_name`` (the host by default) as SNI and the name checked.
    """

    __slots__ = (
        "host",
        "port",
        "connect_timeout",
        "response_timeout",
        "max_idle",
        "loop",
        "host_header",
        "tls",
        "server_name",
        "max_connections",
        "open",
        "opening",
        "_idle",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        response_timeout: float = 60.0,
        max_idle: int = 64,
        loop: asyncio.AbstractEventLoop | None = None,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_idle = max_idle
        self.loop = loop or asyncio.get_event_loop()
        self.tls = tls
        self.server_name = server_name or host.strip("[]")
        # Connections open (idle or in use) and being opened; past the cap, 503 at once.
        self.max_connections = max_connections
        self.open = 0
        self.opening = 0
        default_port = port == (443 if tls is not None else 80)
        authority = f"[{host}]" if ":" in host else host
        self.host_header = (authority if default_port else f"{authority}:{port}").encode()
        self._idle: list[UpstreamConnection] = []

    def __repr__(self) -> str:
        return f"UpstreamPool({self.host}:{self.port}, idle={len(self._idle)})"

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        cap = self.max_connections
        if cap is not None and self.open + self.opening >= cap:
            raise UpstreamBusy(
                f"{self.host}:{self.port} already has {cap} connections open, its limit"
            )
        self.opening += 1
        try:
            _, conn = await open_connection(self, lambda: UpstreamConnection(self))
        finally:
            self.opening -= 1
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.sink = None
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
