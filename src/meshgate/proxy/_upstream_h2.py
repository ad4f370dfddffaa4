"""HTTP/2 upstreams: one multiplexed connection per backend address, a stream per exchange.

An :class:`H2UpstreamPool` answers the engine as :class:`~meshgate.proxy.UpstreamPool`
does (``take_idle``, ``connect``, ``release``, ``close``, the timeouts and
``host_header``), but what it hands out is an :class:`H2UpstreamStream`: one request on
the pool's shared connection, pushing the response to its sink with the same events an
HTTP/1.1 connection does (:class:`~meshgate.proxy._upstream.Sink`), plus
``upstream_trailers`` for a sink that forwards them. The connection is opened over TLS
with ALPN ``h2``, or in cleartext with prior knowledge (h2c); it is opened again when it
dies or the upstream sends GOAWAY, and no more streams are opened on it than the
upstream allows at once (waiting for one to finish, within the connect timeout).

An HTTP/2 client side sends the request with :meth:`H2UpstreamStream.send_headers`,
``send_data`` and ``send_end``. The HTTP/1.1 client side writes its request as HTTP/1.1
bytes, as to any upstream connection: ``write`` reads them back with httptools and sends
them as HTTP/2.

Flow control works per stream, both ways: response bytes are acknowledged to the
upstream only while the sink reads (``pause_reading`` withholds them, so a slow client
holds at most one stream window), and request bytes beyond the upstream's window wait
here with the sink paused (``upstream_pause``) until the upstream opens it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Iterable

import httptools
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

from meshgate.proxy._h2conn import Outbound, client_connection
from meshgate.proxy._upstream import (
    _RESPONSE_DROP,
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    Sink,
    UpstreamError,
    open_connection,
)

__all__ = ["H2UpstreamConnection", "H2UpstreamPool", "H2UpstreamStream"]

log = logging.getLogger("meshgate.proxy")

# Streams opened on one connection at once before the upstream says how many it takes.
_STREAMS_BEFORE_SETTINGS = 100
_HEADER_LIMIT = 65536
# Request fields that are HTTP/1.1's own and never cross to HTTP/2 (RFC 9113 8.2.2).
_HTTP1_ONLY = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"expect",
    }
)


class H2UpstreamStream:
    """One exchange's request and response on an upstream HTTP/2 connection."""

    __slots__ = (
        "pool",
        "connection",
        "stream_id",
        "sink",
        "head_request",
        "closed",
        "reused",
        "paused",
        "last_activity",
        "response_ended",
        "_out",
        "_unacked",
        "_blocked",
        "_held",
        "_http1",
    )

    def __init__(self, connection: H2UpstreamConnection, reused: bool) -> None:
        self.pool = connection.pool
        self.connection = connection
        self.stream_id = 0  # given when the request head is sent: ids go up in that order
        self.sink: Sink | None = None
        self.head_request = False
        self.closed = False
        # True when a loss before the response may be retried on a new stream (the
        # connection served before, or the upstream refused the stream unprocessed).
        self.reused = reused
        self.paused = False
        self.last_activity = connection.loop.time()
        self.response_ended = False
        self._out = Outbound()
        self._unacked = 0
        self._blocked = False  # the sink was told to pause: no window for its bytes
        self._held = False  # a response head went to the sink; flush it after this read
        self._http1: _FromHttp1 | None = None

    def __repr__(self) -> str:
        return f"H2UpstreamStream({self.pool.host}:{self.pool.port}#{self.stream_id})"

    def begin(self, sink: Sink, head_request: bool, upgrade: bool = False) -> None:
        if upgrade:
            # HTTP/2 has no Upgrade (RFC 9113 8.6); WebSocket over it is another protocol.
            raise UpstreamError("a protocol upgrade cannot be forwarded to an HTTP/2 backend")
        self.sink = sink
        self.head_request = head_request

    # the request, as HTTP/2

    def send_headers(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Open the stream with the request head (pseudo-header fields first)."""
        connection = self.connection
        if connection.closed or connection.going_away:
            # Never sent: safe to send again. Told after the caller has finished sending.
            self.reused = True
            connection.loop.call_soon(self._lost, UpstreamError("the upstream went away"))
            return
        conn = connection.h2
        self.stream_id = conn.get_next_available_stream_id()
        connection.streams[self.stream_id] = self
        try:
            conn.send_headers(self.stream_id, fields, end_stream=end_stream)
        except ProtocolError as exc:
            error = UpstreamError(f"the request cannot be sent as HTTP/2: {exc}")
            connection.loop.call_soon(self._lost, error)
            return
        if end_stream:
            self._out.end = self._out.ended = True
        connection.flush()

    def send_data(self, data: bytes) -> None:
        out = self._out
        out.push(data)
        self._drain()

    def send_end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        out = self._out
        if out.end:
            return
        out.finish(trailers)
        self._drain()

    def _drain(self) -> None:
        connection = self.connection
        if self.closed or connection.closed or not self.stream_id:
            return
        try:
            drained = self._out.drain(connection.h2, self.stream_id)
        except ProtocolError as exc:
            # The stream was reset meanwhile; its sink hears of it from the reset.
            log.debug("request body to %r not sent: %s", self, exc)
            return
        connection.flush()
        blocked = not drained or connection.write_paused
        if blocked != self._blocked and self.sink is not None:
            self._blocked = blocked
            if blocked:
                self.sink.upstream_pause()
            else:
                self.sink.upstream_resume()

    # the request, as HTTP/1.1 bytes (from the HTTP/1.1 client side)

    def write(self, data: bytes) -> None:
        reader = self._http1
        if reader is None:
            reader = self._http1 = _FromHttp1(self)
        reader.feed(data)

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.write(b"".join(parts))

    # the response

    def _response(self, event: ResponseReceived) -> None:
        sink = self.sink
        if sink is None:
            return
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        length = False
        for name, value in event.headers:
            if name == b":status":
                status = int(value)
            elif name[0] == 0x3A or name in _RESPONSE_DROP:
                continue
            else:
                if name == b"content-length":
                    length = True
                fields.append((name, value))
        if event.stream_ended is not None or self.head_request or status == 204 or status == 304:
            framing = FRAMING_NONE
        else:
            framing = FRAMING_LENGTH if length else FRAMING_CHUNKED
        self._held = True
        sink.upstream_head(status, fields, framing, True)

    def _data(self, event: DataReceived) -> None:
        sink = self.sink
        if sink is not None and event.data:  # not an empty frame that only ends the stream
            self._held = False
            sink.upstream_body(event.data)
        size = event.flow_controlled_length
        if self.paused:
            self._unacked += size
        elif size:
            self.connection.h2.acknowledge_received_data(size, self.stream_id)

    def _trailers(self, event: TrailersReceived) -> None:
        forward = getattr(self.sink, "upstream_trailers", None)
        if forward is not None:
            forward([(k, v) for k, v in event.headers if k[0] != 0x3A])

    def _ended(self) -> None:
        self.response_ended = True
        sink, self.sink = self.sink, None
        if sink is not None:
            self._held = False
            sink.upstream_done()

    def _lost(self, error: UpstreamError) -> None:
        sink, self.sink = self.sink, None
        self._finish()
        if sink is not None:
            sink.upstream_lost(error)

    def _window_opened(self) -> None:
        if self._out.waiting or self._blocked:
            self._drain()

    # flow control and the end, as the engine asks

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self.last_activity = self.connection.loop.time()  # silence while paused was ours
        unacked, self._unacked = self._unacked, 0
        connection = self.connection
        if unacked and self.stream_id and not connection.closed:
            connection.h2.acknowledge_received_data(unacked, self.stream_id)
            connection.flush()

    def close(self) -> None:
        """Done with the stream: cancel it upstream unless both sides ended."""
        self.sink = None
        if self.closed:
            return
        connection = self.connection
        if self.stream_id and not connection.closed:
            stream = connection.h2.streams.get(self.stream_id)
            if stream is not None and not stream.closed:
                try:
                    connection.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                except ProtocolError:
                    pass
                connection.flush()
        self._finish()

    abort = close

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        connection = self.connection
        if self._unacked and self.stream_id and not connection.closed:
            # Hand the connection window back: these bytes will never be read.
            connection.h2.acknowledge_received_data(self._unacked, self.stream_id)
            self._unacked = 0
        connection.stream_finished(self)


class _FromHttp1:
    """Reads back the HTTP/1.1 request an HTTP/1.1 client side writes, and sends it on."""

    __slots__ = ("stream", "parser", "url", "fields", "trailers", "in_head", "failed")

    def __init__(self, stream: H2UpstreamStream) -> None:
        self.stream = stream
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.in_head = True
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.failed = True
            log.error("the request for %r is not HTTP/1.1 the engine wrote: %s", self.stream, exc)
            self.stream.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.fields.append((name.lower(), value))
        else:
            self.trailers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        stream = self.stream
        pool = stream.pool
        authority = pool.host_header
        out: list[tuple[bytes, bytes]] = []
        for name, value in self.fields:
            if name in _HTTP1_ONLY:
                if name == b"host":
                    authority = value
                continue
            out.append((name, value))
        head = [
            (b":method", self.parser.get_method()),
            (b":scheme", pool.scheme),
            (b":authority", authority),
            (b":path", self.url),
        ]
        stream.send_headers(head + out, end_stream=False)

    def on_body(self, body: bytes) -> None:
        self.stream.send_data(body)

    def on_message_complete(self) -> None:
        self.stream.send_end(self.trailers or None)


class H2UpstreamConnection(asyncio.Protocol):
    """The HTTP/2 connection to one upstream address, shared by the streams of its pool."""

    __slots__ = (
        "pool",
        "loop",
        "transport",
        "h2",
        "streams",
        "reserved",
        "served",
        "closed",
        "going_away",
        "write_paused",
    )

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.h2 = client_connection(_HEADER_LIMIT)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0  # streams handed out and not finished (some not opened yet)
        self.served = 0
        self.closed = False
        self.going_away = False
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def capacity(self) -> int:
        """How many more streams may be opened now."""
        if self.closed or self.going_away:
            return 0
        most = self.h2.remote_settings.max_concurrent_streams
        if most > 1 << 31:  # the upstream has not said yet
            most = _STREAMS_BEFORE_SETTINGS
        return most - self.reserved

    def open_stream(self) -> H2UpstreamStream:
        self.reserved += 1
        stream = H2UpstreamStream(self, reused=self.served > 0)
        self.served += 1
        return stream

    def stream_finished(self, stream: H2UpstreamStream) -> None:
        self.reserved -= 1
        if stream.stream_id:
            self.streams.pop(stream.stream_id, None)
        if self.going_away and not self.reserved:
            self.close()
        else:
            self.pool.slot_freed()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.flush()
            self._fail(UpstreamError(f"invalid HTTP/2 from upstream: {exc}"))
            return
        streams = self.streams
        now = self.loop.time()
        held: list[H2UpstreamStream] = []
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
                stream.last_activity = now
                stream._data(event)
            elif isinstance(event, ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.last_activity = now
                    stream._response(event)
                    held.append(stream)
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._ended()
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._trailers(event)
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    if event.error_code == ErrorCodes.REFUSED_STREAM:
                        stream.reused = True  # not processed: safe to send again
                    stream._lost(
                        UpstreamError(f"the upstream reset the stream ({event.error_code!s})")
                    )
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream._window_opened()
                else:
                    for stream in list(streams.values()):
                        stream._window_opened()
            elif isinstance(event, ConnectionTerminated):
                self._goaway(event)
            elif isinstance(event, RemoteSettingsChanged):
                self.pool.slot_freed()
                for stream in list(streams.values()):
                    stream._window_opened()
        for stream in held:
            if stream._held:
                stream._held = False
                if stream.sink is not None:
                    stream.sink.upstream_flush()
        self.flush()

    def _goaway(self, event: ConnectionTerminated) -> None:
        self.going_away = True
        self.pool.drop(self)
        last = event.last_stream_id if event.last_stream_id is not None else 0
        failed = event.error_code != ErrorCodes.NO_ERROR
        detail = f"the upstream sent GOAWAY ({event.error_code!s})"
        for stream in list(self.streams.values()):
            if stream.stream_id > last or failed:
                # Streams above the last one the upstream processed are safe to retry.
                stream.reused = stream.reused or stream.stream_id > last
                stream._lost(UpstreamError(detail))
        if failed or not self.reserved:
            self.close()

    def _fail(self, error: UpstreamError) -> None:
        self.going_away = True
        self.pool.drop(self)
        for stream in list(self.streams.values()):
            stream._lost(error)
        self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream._drain()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.drop(self)
        error = UpstreamError("upstream closed the connection" if exc is None else str(exc))
        for stream in list(self.streams.values()):
            stream._lost(error)
        self.pool.slot_freed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.drop(self)
        if self.transport is not None:
            try:
                self.h2.close_connection()
            except ProtocolError:
                pass
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)
            self.transport.close()

    def close_when_idle(self) -> None:
        """Open no more streams; close once those open have finished."""
        self.going_away = True
        if not self.reserved:
            self.close()


class H2UpstreamPool:
    """The HTTP/2 connection to one backend address, opened on demand and shared.

    With ``tls`` (a client context, see :func:`~meshgate.proxy.client_context`) the
    connection is TLS and must negotiate ``h2`` by ALPN; without, it is cleartext
    HTTP/2 with prior knowledge (h2c).
    """

    multiplexed = True

    __slots__ = (
        "host",
        "port",
        "connect_timeout",
        "response_timeout",
        "max_idle",
        "loop",
        "tls",
        "server_name",
        "host_header",
        "scheme",
        "_conn",
        "_opening",
        "_waiters",
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
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_idle = max_idle  # unused: one connection carries every stream
        self.loop = loop or asyncio.get_event_loop()
        self.tls = tls
        self.server_name = server_name or host.strip("[]")
        default_port = port == (443 if tls is not None else 80)
        authority = f"[{host}]" if ":" in host else host
        self.host_header = (authority if default_port else f"{authority}:{port}").encode()
        self.scheme = b"https" if tls is not None else b"http"
        self._conn: H2UpstreamConnection | None = None
        self._opening: asyncio.Future[H2UpstreamConnection] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        kind = "h2" if self.tls is not None else "h2c"
        return f"H2UpstreamPool({kind} {self.host}:{self.port})"

    def take_idle(self) -> H2UpstreamStream | None:
        """A new stream on the open connection, if it has room for one now."""
        conn = self._conn
        if conn is not None and conn.capacity > 0:
            return conn.open_stream()
        return None

    async def connect(self) -> H2UpstreamStream:
        """A new stream: on the open connection, on a new one, or once one finishes."""
        deadline = self.loop.time() + self.connect_timeout
        while True:
            conn = self._conn
            if conn is None or conn.closed or conn.going_away:
                conn = await self._connection()
            if conn.capacity > 0:
                return conn.open_stream()
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                raise UpstreamError(
                    f"{self.host}:{self.port} had no free HTTP/2 stream "
                    f"within {self.connect_timeout}s"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connection(self) -> H2UpstreamConnection:
        opening = self._opening
        if opening is None:
            opening = self._opening = self.loop.create_task(self._open())
            opening.add_done_callback(self._opened)
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[H2UpstreamConnection]) -> None:
        if self._opening is opening:
            self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._conn = opening.result()
        self.slot_freed()

    async def _open(self) -> H2UpstreamConnection:
        tls = self.tls
        transport, conn = await open_connection(self, lambda: H2UpstreamConnection(self))
        if tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                conn.close()
                raise UpstreamError(
                    f"{self.host}:{self.port} did not agree to HTTP/2 over TLS "
                    f"(ALPN gave {alpn or 'nothing'})"
                )
        return conn

    def slot_freed(self) -> None:
        """A stream finished (or the connection changed): let a waiting exchange look again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def drop(self, conn: H2UpstreamConnection) -> None:
        """``conn`` takes no more streams: the next exchange opens a new connection."""
        if self._conn is conn:
            self._conn = None
        # Whoever waits for a stream on it now opens the next connection instead.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def release(self, stream: H2UpstreamStream) -> None:
        stream.close()

    def forget(self, stream: H2UpstreamStream) -> None:
        pass

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close_when_idle()
