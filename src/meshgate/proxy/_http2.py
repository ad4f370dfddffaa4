"""HTTP/2, the client side: one asyncio protocol per connection, ``h2`` as the protocol core.

Every stream is an exchange served as ``_http1`` serves a request: the handler decides
(a local response, or forwarding), the upstream connection pushes the response to the
stream (the stream is its sink), and one timer per connection watches every stream's
deadline. Streams never wait on each other: each has its own upstream connection (or
upstream HTTP/2 stream) and its own flow-control windows.

Back pressure, both ways, per stream:

- request body: DATA is acknowledged to the client (its window reopened) only once the
  upstream transport took it; while the upstream cannot keep up (``upstream_pause``) the
  client's window runs out and it stops sending on that stream;
- response body: what the client's windows do not admit waits here, and the stream's
  upstream connection stops reading (``pause_reading``) until a WINDOW_UPDATE.

Defences: the advertised concurrent-stream limit (streams beyond it are refused with
REFUSED_STREAM), the header list limit (h2's HPACK decoder), a header block bounded
before its end (CONTINUATION flood), the header, idle and body timeouts, and a bound on
streams the client cancels before their response (rapid reset, CVE-2023-44487): beyond
it the connection ends with GOAWAY. Protocol errors end the connection with GOAWAY,
as h2 words them, without a traceback.

gRPC calls (``content-type: application/grpc*``): a refusal of the engine or the role
(any local non-2xx response) is answered as a trailers-only gRPC status, and
``grpc-timeout`` bounds the wait for the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

from meshgate.proxy._exchange import (
    ClientDisconnected,
    Exchange,
    Handler,
    Request,
    RequestBodyError,
    Response,
    problem,
    retry_hook,
    wrap_headers,
)
from meshgate.proxy._grpc import grpc_timeout, is_grpc, problem_message, trailers_only
from meshgate.proxy._h2conn import Outbound, server_connection
from meshgate.proxy._http1 import (
    _REQUEST_ID,
    _REQUEST_SKIP,
    _body_problem,
    _BodyRead,
    _clock,
    _detail,
    _now,
    _request_id,
    _request_line_start,
    _too_large,
)
from meshgate.proxy._path import BadTarget, split_target
from meshgate.proxy._tls import TlsInfo
from meshgate.proxy._upstream import (
    FRAMING_NONE,
    UpstreamError,
)
from meshgate.proxy._upstream_h2 import H2UpstreamStream

if TYPE_CHECKING:
    from meshgate.proxy._server import Server

__all__ = ["H2Protocol", "serve_h2"]

log = logging.getLogger("meshgate.proxy")

# The stages of a stream, as _http1's cycle has them.
_NEW = 0  # its head arrived; the handler has not seen it yet
_DECIDING = 1
_CONNECTING = 2
_WAITING = 3  # the request went upstream, its response head has not come back
_STREAMING = 4  # the response head was sent; the body flows
_DONE = 5  # on_complete ran

# Rapid reset: streams the client cancels before their response (or that are refused),
# counted over a window; beyond twice the concurrent-stream limit the connection ends.
_RESET_WINDOW = 10.0
# Response fields that are HTTP/1.1's own and must not appear in HTTP/2 (RFC 9113 8.2.2).
_RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"x-request-id",
    }
)
_NO_BODY_STATUS = frozenset({204, 304})
_INF = math.inf


def serve_h2(server: Server, transport: asyncio.Transport, initial: bytes) -> None:
    """Serve ``transport`` as HTTP/2 from now on; ``initial`` was read already (the preface
    of a cleartext connection, or nothing after a TLS handshake that chose ``h2``)."""
    protocol = H2Protocol(server, transport)
    transport.set_protocol(protocol)
    protocol.start(initial)


class _Stream:
    """One request on the connection, from its head to the end of its response.

    It is the sink of its upstream connection, and the body source of its exchange.
    """

    __slots__ = (
        "protocol",
        "stream_id",
        "exchange",
        "handler",
        "stage",
        "body_done",
        "buffered",
        "buffered_size",
        "unacked",
        "upstream",
        "upstream_chunked",
        "upstream_reusable",
        "upstream_blocked",
        "window_blocked",
        "response_started",
        "out",
        "failure",
        "reading",
        "retry_allowed",
        "bytes_seen",
        "deadline",
        "grpc",
        "grpc_deadline",
        "request_trailers",
        "response_trailers",
        "response_timeout",
    )

    def __init__(self, protocol: H2Protocol, stream_id: int, exchange: Exchange) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self.exchange = exchange
        self.handler: Handler | None = None
        self.stage = _NEW
        self.body_done = False
        self.buffered: list[bytes] | None = None
        self.buffered_size = 0
        self.unacked = 0  # flow-controlled request bytes not acknowledged to the client yet
        self.upstream: Any = None  # UpstreamConnection or H2UpstreamStream
        self.upstream_chunked = False
        self.upstream_reusable = False
        self.upstream_blocked = False  # the upstream cannot take more request bytes now
        self.window_blocked = False  # the client's window holds response bytes back
        self.response_started = False
        self.out = Outbound()
        self.failure: Response | None = None
        self.reading: _BodyRead | None = None
        self.retry_allowed = False
        self.bytes_seen = 0
        self.deadline = _INF
        self.grpc = False
        self.grpc_deadline = _INF
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        self.response_trailers: list[tuple[bytes, bytes]] | None = None
        self.response_timeout = 0.0

    # the sink of the upstream connection

    def upstream_head(
        self, status: int, raw: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None:
        if self.stage != _WAITING:
            return
        protocol = self.protocol
        exchange = self.exchange
        statuses = exchange.retry_statuses
        if statuses is not None and status in statuses and protocol._retry(self, status, None):
            return
        self.stage = _STREAMING
        exchange.status = status
        exchange.upstream_headers_at = _now()
        self.upstream_reusable = keep_alive
        headers = exchange.response_headers = wrap_headers(raw)
        try:
            self.handler.on_response(exchange, status, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        end = framing == FRAMING_NONE
        if not protocol._send_head(self, status, headers.raw(), end):
            return
        self.response_started = True
        if end:
            self.out.end = self.out.ended = True
        conn = self.upstream
        if conn is not None:
            protocol._set_deadline(self, conn.last_activity + self.response_timeout)
        protocol._flush_soon()

    def upstream_body(self, data: bytes) -> None:
        if self.stage != _STREAMING:
            return
        self.exchange.bytes_out += len(data)
        self.out.push(data)
        if not self.window_blocked:
            self.protocol._drain(self)
            self.protocol._flush_soon()

    def upstream_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.response_trailers = [(k, v) for k, v in fields if k not in _RESPONSE_DROP]

    def upstream_flush(self) -> None:
        pass  # the head left as a frame already

    def upstream_done(self) -> None:
        if self.stage != _STREAMING:
            return
        protocol = self.protocol
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if self.upstream_reusable and self.body_done and not conn.closed:
                conn.resume_reading()  # paused by the client's back pressure, now idle
                conn.pool.release(conn)
            else:
                conn.close()
        out = self.out
        if not out.end:
            out.finish(self.response_trailers)
        if not self.window_blocked:
            protocol._drain(self)
        protocol._flush_soon()

    def upstream_lost(self, exc: Exception | None) -> None:
        stage = self.stage
        if stage != _WAITING and stage != _STREAMING:
            return
        protocol = self.protocol
        conn, self.upstream = self.upstream, None
        exchange = self.exchange
        exchange.error = str(exc) if exc else "upstream closed the connection"
        if stage == _WAITING:
            if conn is not None and conn.reused and self.retry_allowed:
                # The upstream closed a reused connection before answering: it was stale.
                self.retry_allowed = False
                self.stage = _CONNECTING
                protocol.loop.create_task(protocol._connect(self, conn.pool))
                return
            if protocol._retry(self, 502, exchange.error):
                return
            protocol._respond(self, problem(502, "Bad Gateway", exchange.error))
        else:
            # Cut short: the client must see a broken stream, not a complete-looking body.
            protocol._reset(self, ErrorCodes.INTERNAL_ERROR)
            protocol._complete(self)
        protocol._flush_soon()

    def upstream_pause(self) -> None:
        self.upstream_blocked = True

    def upstream_resume(self) -> None:
        if self.upstream_blocked:
            self.upstream_blocked = False
            self.protocol._acknowledge(self)
            self.protocol._flush_soon()

    # the body source of the exchange (Exchange.read_body)

    def request_body(self, exchange: Exchange, limit: int | None) -> bytes | Awaitable[bytes]:
        """The whole body of the request being decided: the bytes, or a future of them."""
        if exchange is not self.exchange or self.stage != _DECIDING:
            raise RuntimeError("read_body() is for the handler, before it answers")
        protocol = self.protocol
        reading = self.reading
        if reading is not None:
            if reading.error is not None:
                raise reading.error
            if reading.body is not None:
                return reading.body
            raise RuntimeError("read_body() is already waiting for this request's body")
        failure = self.failure
        if failure is not None:
            raise protocol._body_failed(self, RequestBodyError(failure.status, _detail(failure)))
        most = exchange.max_body_size
        if most is not None and (limit is None or most < limit):
            limit = most
        reading = self.reading = _BodyRead(limit, protocol.loop.time())
        if limit is not None:
            length = exchange.request.content_length
            if exchange.bytes_in > limit or (length is not None and length > limit):
                raise protocol._body_failed(self, _too_large(limit))
        if self.body_done:
            return protocol._body_read(self, reading)
        if protocol._closed:
            raise protocol._body_failed(
                self,
                ClientDisconnected(400, "the client went away before the request body arrived"),
            )
        # The handler consumes the body: what is held is acknowledged, and what comes next
        # as it arrives (bounded by the limit, not by the stream window).
        protocol._acknowledge(self)
        protocol._flush_soon()
        waiter = reading.waiter = protocol.loop.create_future()
        self.deadline = reading.last_at + protocol.settings.body_timeout
        protocol._schedule(self.deadline)
        return waiter


class H2Protocol(asyncio.Protocol):
    """Serves one client connection that speaks HTTP/2."""

    __slots__ = (
        "server",
        "settings",
        "loop",
        "transport",
        "h2",
        "tls",
        "client_ip",
        "streams",
        "max_streams",
        "_new",
        "_closed",
        "_going_away",
        "_write_paused",
        "_flush_handle",
        "_timer",
        "_timer_at",
        "_idle_since",
        "_served",
        "_block_since",
        "_resets",
        "_resets_since",
    )

    def __init__(self, server: Server, transport: asyncio.Transport) -> None:
        self.server = server
        self.settings = settings = server.settings
        self.loop = server.loop
        self.transport: asyncio.Transport | None = transport
        self.max_streams = settings.max_concurrent_streams
        self.h2 = server_connection(self.max_streams, settings.max_header_size)
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls: TlsInfo | None = TlsInfo.of(ssl_object) if ssl_object is not None else None
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self.streams: dict[int, _Stream] = {}
        self._new: list[_Stream] = []
        self._closed = False
        self._going_away = False
        self._write_paused = False
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._idle_since = self.loop.time()
        self._served = 0
        self._block_since = 0.0  # when the unfinished header block began, if one has
        self._resets = 0
        self._resets_since = self._idle_since

    def start(self, initial: bytes) -> None:
        self.server.connections.add(self)
        self._flush()
        self._schedule(self._idle_since + self.settings.header_timeout)
        if initial:
            self.data_received(initial)

    # connection events

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # h2 queued the GOAWAY that names the error; nothing more is read.
            log.info("HTTP/2 connection from %s ended: %s", self.client_ip, exc)
            self._close()
            return
        resets: set[int] | None = None
        for event in events:
            if isinstance(event, StreamReset):
                if resets is None:
                    resets = set()
                resets.add(event.stream_id)
        for event in events:
            if isinstance(event, DataReceived):
                self._on_data(event)
            elif isinstance(event, RequestReceived):
                self._on_request(event, resets)
            elif isinstance(event, StreamEnded):
                self._on_request_end(event.stream_id)
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.request_trailers = [(k, v) for k, v in event.headers]
            elif isinstance(event, WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, StreamReset):
                self._on_reset(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                self._on_window(0)
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway()
            if self._closed:
                return
        new, self._new = self._new, []
        for stream in new:
            if stream.stage == _NEW and not self._closed:
                self._begin(stream)
        if self.h2.incoming_buffer.in_header_block:  # type: ignore[attr-defined]
            if not self._block_since:
                self._block_since = self.loop.time()
                self._schedule(self._block_since + self.settings.header_timeout)
        else:
            self._block_since = 0.0
        self._flush()

    def eof_received(self) -> bool | None:
        if self._closed:
            return False
        # The client sends nothing more; responses it waits for may still go out.
        for stream in list(self.streams.values()):
            if not stream.body_done:
                self._fail(stream, problem(400, "Bad Request", "the client closed its side"))
        self._flush()
        if not self.streams:
            self._close()
            return False
        # Over TLS the transport closes on EOF whatever is returned (and warns if True).
        return self.tls is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.transport = None
        self.server.connections.discard(self)
        self._cancel_timer()
        for stream in list(self.streams.values()):
            conn, stream.upstream = stream.upstream, None
            if conn is not None and not conn.closed:
                conn.abort()
            stream.exchange.error = stream.exchange.error or "client closed the connection"
            reading = stream.reading
            if reading is not None and reading.waiter is not None:
                self._body_failed(
                    stream, ClientDisconnected(400, "the client closed the connection")
                )
            # A running handler completes the exchange when it returns.
            if stream.stage >= _CONNECTING:
                self._complete(stream)

    def pause_writing(self) -> None:
        # The client does not read what it is sent: stop reading upstreams, and the client
        # too (it may send PINGs and SETTINGS without reading their answers).
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        for stream in self.streams.values():
            if stream.upstream is not None and stream.stage == _STREAMING:
                stream.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()
        for stream in self.streams.values():
            if stream.upstream is not None and not stream.window_blocked:
                stream.upstream.resume_reading()

    def shutdown(self) -> None:
        """Tell the client no new streams are taken (GOAWAY); close once those open end."""
        if self._closed:
            return
        self._goaway(ErrorCodes.NO_ERROR)
        self._flush()
        if not self.streams:
            self._close()

    # h2 events

    def _on_request(self, event: RequestReceived, resets: set[int] | None) -> None:
        stream_id = event.stream_id
        if resets is not None and stream_id in resets:
            # Opened and cancelled in the same read: never started (rapid reset).
            self._count_reset()
            return
        if self._going_away or len(self.streams) >= self.max_streams:
            self._refuse(stream_id)
            return
        self._served += 1
        stream = self._stream(event)
        self.streams[stream_id] = stream
        if event.stream_ended is not None:
            stream.body_done = True
        else:
            # Only a request with a body has one to read (Exchange.read_body).
            stream.exchange._body_source = stream
        self._new.append(stream)

    def _stream(self, event: RequestReceived) -> _Stream:
        method = b"GET"
        target = b"/"
        authority = b""
        host = b""
        request_id = b""
        content_length: int | None = None
        failure: Response | None = None
        fields: list[tuple[bytes, bytes]] = []
        for name, value in event.headers:
            if name[0] == 0x3A:  # ':' -- h2 checked that these come first, once each
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"content-length":
                if value.isdigit():
                    content_length = int(value)
                else:
                    failure = problem(400, "Bad Request", "invalid Content-Length")
            elif name == b"host":
                host = value
            elif name == b"x-request-id":
                request_id = value
            fields.append((name, value))
        if method == b"CONNECT":
            failure = failure or problem(501, "Not Implemented", "CONNECT is not supported")
        try:
            path, query = split_target(target)
        except BadTarget as exc:
            path, query = "/", ""
            failure = failure or problem(400, "Bad Request", str(exc))
        rid = request_id.decode() if request_id and _REQUEST_ID.match(request_id) else _request_id()
        request = Request(
            method.decode("ascii", errors="replace"),
            target,
            path,
            query,
            wrap_headers(fields),
            "2",
            self.client_ip,
            self.settings.scheme,
            (authority or host).decode("latin-1"),
            content_length,
            # A body of undeclared length: what "chunked" means to the roles in HTTP/1.1.
            content_length is None and event.stream_ended is None,
            rid,
            self.tls,
        )
        stream = _Stream(self, event.stream_id, Exchange(request, _now()))
        stream.failure = failure
        if is_grpc(request):
            stream.grpc = True
            timeout = grpc_timeout(request.headers.get_raw(b"grpc-timeout"))
            if timeout is not None:
                stream.grpc_deadline = self.loop.time() + timeout
        return stream

    def _on_data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length
        stream = self.streams.get(stream_id)
        if stream is None or stream.stage == _DONE or stream.failure is not None:
            if size:
                # Nobody reads these bytes: give the window back at once.
                self.h2.acknowledge_received_data(size, stream_id)
            return
        data = event.data
        if not data:
            # An empty DATA frame (padding only, or just END_STREAM): nothing to pass on.
            if size:
                self.h2.acknowledge_received_data(size, stream_id)
            return
        exchange = stream.exchange
        exchange.bytes_in += len(data)
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            self.h2.acknowledge_received_data(size, stream_id)
            self._fail(
                stream,
                problem(413, "Content Too Large", f"the request body exceeds {limit} bytes"),
            )
            return
        conn = stream.upstream
        if conn is not None:
            stream.unacked += size
            self._send_body(stream, conn, data)
            if not stream.upstream_blocked:
                self._acknowledge(stream)
            return
        if stream.buffered is None:
            stream.buffered = [data]
        else:
            stream.buffered.append(data)
        stream.buffered_size += len(data)
        stream.unacked += size
        reading = stream.reading
        if reading is not None:
            # The handler consumes the body: acknowledged as it comes; its limit bounds it.
            self._acknowledge(stream)
            most = reading.limit
            if most is not None and stream.buffered_size > most:
                self._body_failed(stream, _too_large(most))
            else:
                reading.last_at = self.loop.time()

    def _on_request_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.body_done:
            return
        stream.body_done = True
        conn = stream.upstream
        if conn is not None:
            self._end_body(stream, conn)
            if stream.stage == _WAITING:
                # The response timeout counts from the end of the request.
                self._set_deadline(stream, self.loop.time() + stream.response_timeout)
            return
        reading = stream.reading
        if reading is not None and reading.waiter is not None:
            waiter, reading.waiter = reading.waiter, None
            body = self._body_read(stream, reading)
            if not waiter.done():
                waiter.set_result(body)

    def _on_window(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.out.waiting:
                self._drain(stream)
            return
        for stream in list(self.streams.values()):
            if stream.out.waiting:
                self._drain(stream)

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.out.ended:
            self._count_reset()
        exchange = stream.exchange
        exchange.error = exchange.error or "the client cancelled the stream"
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        reading = stream.reading
        if reading is not None and reading.waiter is not None:
            self._body_failed(stream, ClientDisconnected(400, "the client cancelled the stream"))
        stream.out = Outbound()
        stream.out.end = stream.out.ended = True
        # Nothing is sent on a reset stream.
        stream.response_started = True
        if stream.stage >= _CONNECTING or stream.stage == _NEW:
            self._complete(stream)
        else:
            # The handler is deciding: it completes the exchange when it returns. The
            # stream is closed: it no longer counts against the concurrent-stream limit.
            stream.failure = stream.failure or problem(400, "Bad Request", exchange.error)
            del self.streams[stream_id]

    def _on_goaway(self) -> None:
        # The client opens no more streams; those open finish.
        self._going_away = True
        if not self.streams:
            self._close()

    def _count_reset(self) -> None:
        now = self.loop.time()
        if now - self._resets_since > _RESET_WINDOW:
            self._resets_since = now
            self._resets = 0
        self._resets += 1
        if self._resets > 2 * self.max_streams:
            log.warning(
                "HTTP/2 connection from %s cut off: %d streams cancelled within %ss",
                self.client_ip,
                self._resets,
                _RESET_WINDOW,
            )
            self._abandon(ErrorCodes.ENHANCE_YOUR_CALM, b"too many streams cancelled")

    def _refuse(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        except ProtocolError:
            pass
        self._count_reset()

    # serving a stream: handler -> local response, or upstream -> head -> body -> end

    def _begin(self, stream: _Stream) -> None:
        handler = stream.handler = self.server.handler
        if stream.failure is not None:
            self._respond(stream, stream.failure)
            return
        stream.stage = _DECIDING
        exchange = stream.exchange
        try:
            decision = handler.handle(exchange)
        except Exception:
            decision = self._handler_failed(exchange)
        if decision is None or isinstance(decision, Response):
            self._decided(stream, decision)
        else:
            self.loop.create_task(self._decide_later(stream, decision))

    async def _decide_later(self, stream: _Stream, decision: Awaitable[Response | None]) -> None:
        try:
            response = await decision
        except RequestBodyError as exc:
            response = _body_problem(exc)
        except Exception:
            response = self._handler_failed(stream.exchange)
        reading = stream.reading
        if reading is not None and reading.waiter is not None:
            waiter, reading.waiter = reading.waiter, None
            waiter.cancel()
            stream.reading = None
        self._decided(stream, response)
        self._flush()

    def _handler_failed(self, exchange: Exchange) -> Response:
        request = exchange.request
        log.exception("handler failed on %s %s", request.method, request.path)
        return problem(500, "Internal Server Error", "the gateway failed on this request")

    def _decided(self, stream: _Stream, response: Response | None) -> None:
        if stream.stage == _DONE:
            return
        if stream.failure is not None:
            response = stream.failure
        elif response is None:
            if self._closed:
                self._complete(stream)
                return
            if stream.exchange.upstream is not None:
                self._forward(stream)
                return
            response = problem(500, "Internal Server Error", "no upstream chosen")
        self._respond(stream, response)

    def _respond(self, stream: _Stream, response: Response) -> None:
        if not self._closed and not stream.response_started:
            self._send_local(stream, response)
        if not stream.out.waiting or self._closed:
            self._complete(stream)

    def _forward(self, stream: _Stream) -> None:
        exchange = stream.exchange
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            self._respond(
                stream, problem(413, "Content Too Large", f"the request body exceeds {limit} bytes")
            )
            return
        try:
            pool = exchange.upstream
            exchange.upstream_start = _now()
            exchange.attempts += 1
            stream.retry_allowed = stream.body_done and not stream.buffered_size
            timeout = exchange.timeout
            if timeout is None:
                timeout = pool.response_timeout
            if timeout < self.server.min_span:
                self.server.min_span = timeout
            if stream.grpc_deadline < _INF:
                timeout = min(timeout, max(0.0, stream.grpc_deadline - self.loop.time()))
            stream.response_timeout = timeout
            conn = pool.take_idle()
            if conn is None:
                stream.stage = _CONNECTING
                if stream.grpc_deadline < _INF:
                    self._set_deadline(stream, stream.grpc_deadline)
                self.loop.create_task(self._connect(stream, pool))
            else:
                self._send_request(stream, conn)
        except Exception:
            self._forward_failed(stream)

    async def _connect(self, stream: _Stream, pool: Any) -> None:
        try:
            conn = await pool.connect()
        except Exception as exc:
            if stream.stage != _CONNECTING:
                return
            if not isinstance(exc, UpstreamError):
                self._forward_failed(stream)
            else:
                stream.exchange.error = stream.exchange.error or str(exc)
                if not self._retry(stream, exc.status, str(exc)):
                    self._respond(stream, problem(502, "Bad Gateway", str(exc)))
            self._flush()
            return
        if stream.stage != _CONNECTING or self._closed:
            # The client went away, or cancelled the stream, while we connected.
            pool.release(conn)
            return
        try:
            self._send_request(stream, conn)
        except Exception:
            self._forward_failed(stream)
        self._flush()

    def _forward_failed(self, stream: _Stream) -> None:
        log.exception("forwarding failed")
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        if stream.response_started:
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)
            self._complete(stream)
            return
        self._respond(stream, problem(502, "Bad Gateway", "the gateway failed to forward"))

    def _retry(self, stream: _Stream, status: int, error: str | None) -> bool:
        """Offer the failed attempt to the handler's ``retry``; True when it is sent again.

        Only before the response head went out, and only for a request that can be sent
        again whole: no body, or one the handler read (the engine still holds it).
        """
        retry = retry_hook(stream.handler)  # type: ignore[arg-type]
        if retry is None or self._closed or stream.response_started or not stream.body_done:
            return False
        exchange = stream.exchange
        reading = stream.reading
        if exchange.request.has_body and (reading is None or reading.body is None):
            return False
        try:
            again = retry(exchange, status, error)
        except Exception:
            log.exception("retry phase failed")
            return False
        if not again or exchange.upstream is None:
            return False
        # Discarded, not drained: whatever else that attempt sends, nobody reads it.
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        stream.stage = _CONNECTING  # deaf to the old upstream's events from here on
        stream.upstream_blocked = False
        stream.response_trailers = None
        exchange.error = None
        if reading is not None and reading.body:
            stream.buffered, stream.buffered_size = [reading.body], len(reading.body)
        self._set_deadline(stream, _INF)  # the gRPC deadline still holds
        # Sent once the callback that failed has unwound (it may be the old parser's).
        self.loop.call_soon(self._attempt_again, stream)
        return True

    def _attempt_again(self, stream: _Stream) -> None:
        if stream.stage == _CONNECTING and stream.upstream is None and not self._closed:
            self._forward(stream)
            self._flush()

    def _send_request(self, stream: _Stream, conn: Any) -> None:
        exchange = stream.exchange
        request = exchange.request
        stream.upstream = conn
        stream.stage = _WAITING
        conn.begin(stream, request.method == "HEAD")
        if self._write_paused:
            conn.pause_reading()
        buffered = stream.buffered
        has_body = not stream.body_done or bool(buffered)
        stream.buffered, stream.buffered_size = None, 0
        if isinstance(conn, H2UpstreamStream):
            conn.send_headers(
                self._h2_request_fields(exchange, conn.pool.host_header, conn.pool.scheme),
                end_stream=stream.body_done and not buffered and not stream.request_trailers,
            )
            for chunk in buffered or ():
                conn.send_data(chunk)
            if stream.body_done:
                conn.send_end(stream.request_trailers)
        else:
            head = self._h1_request_head(stream, exchange, conn.pool.host_header, has_body)
            out = [head]
            for chunk in buffered or ():
                if stream.upstream_chunked:
                    out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                else:
                    out.append(chunk)
            if stream.body_done and stream.upstream_chunked:
                out.append(self._last_chunk(stream))
            conn.writelines(out)
        if not stream.upstream_blocked:
            self._acknowledge(stream)
        wait = stream.response_timeout
        if not stream.body_done:
            wait = min(wait, self.settings.body_timeout)
        self._set_deadline(stream, self.loop.time() + wait)

    def _send_body(self, stream: _Stream, conn: Any, data: bytes) -> None:
        if isinstance(conn, H2UpstreamStream):
            conn.send_data(data)
        elif stream.upstream_chunked:
            conn.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.write(data)

    def _end_body(self, stream: _Stream, conn: Any) -> None:
        if isinstance(conn, H2UpstreamStream):
            conn.send_end(stream.request_trailers)
        elif stream.upstream_chunked:
            conn.write(self._last_chunk(stream))

    def _last_chunk(self, stream: _Stream) -> bytes:
        trailers = stream.request_trailers
        if not trailers:
            return b"0\r\n\r\n"
        lines = [b"0\r\n"]
        for name, value in trailers:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _forwarding_fields(self, request: Request) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The request's fields an upstream gets, and the X-Forwarded-For it was sent."""
        fields: list[tuple[bytes, bytes]] = []
        xff = b""
        cookies: list[bytes] = []
        skip = _REQUEST_SKIP
        for name, value in request.headers.raw():
            if name not in skip:
                if name == b"cookie":
                    cookies.append(value)
                else:
                    fields.append((name, value))
            elif name == b"x-forwarded-for":
                xff += value + b", "
        if cookies:
            # RFC 9113 8.2.3: HTTP/2 may split the cookie field; one field when forwarded.
            fields.append((b"cookie", b"; ".join(cookies)))
        return fields, xff

    def _h1_request_head(
        self, stream: _Stream, exchange: Exchange, host_header: bytes, has_body: bool
    ) -> bytes:
        request = exchange.request
        fields, xff = self._forwarding_fields(request)
        parts = [
            _request_line_start(request.method),
            exchange.upstream_target.encode("latin-1"),
            b" HTTP/1.1\r\nhost: ",
            host_header,
            b"\r\n",
        ]
        for name, value in fields:
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"x-forwarded-for: ",
            xff,
            request.client_ip.encode("ascii"),
            b"\r\nx-forwarded-proto: ",
            request.scheme.encode("ascii"),
            b"\r\nx-request-id: ",
            request.request_id.encode("ascii"),
            b"\r\n",
        )
        if request.host:
            parts += (b"x-forwarded-host: ", request.host.encode("latin-1"), b"\r\n")
        if request.content_length is not None:
            parts.append(b"content-length: %d\r\n\r\n" % request.content_length)
        elif has_body:
            stream.upstream_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _h2_request_fields(
        self, exchange: Exchange, authority: bytes, scheme: bytes
    ) -> list[tuple[bytes, bytes]]:
        request = exchange.request
        fields, xff = self._forwarding_fields(request)
        out = [
            (b":method", request.method.encode("ascii")),
            (b":scheme", scheme),
            (b":authority", authority),
            (b":path", exchange.upstream_target.encode("latin-1")),
        ]
        out += fields
        if request.headers.get_raw(b"te") == b"trailers":
            out.append((b"te", b"trailers"))
        if request.content_length is not None:
            out.append((b"content-length", b"%d" % request.content_length))
        out += (
            (b"x-forwarded-for", xff + request.client_ip.encode("ascii")),
            (b"x-forwarded-proto", request.scheme.encode("ascii")),
            (b"x-request-id", request.request_id.encode("ascii")),
        )
        if request.host:
            out.append((b"x-forwarded-host", request.host.encode("latin-1")))
        return out

    # responses

    def _send_head(
        self, stream: _Stream, status: int, fields: list[tuple[bytes, bytes]], end: bool
    ) -> bool:
        """Send a response head; False when h2 refused it (the stream is reset then)."""
        out = [(b":status", b"%d" % status)]
        dated = False
        for name, value in fields:
            if name in _RESPONSE_DROP:
                continue
            if name == b"date":
                dated = True
            out.append((name, value))
        if not dated:
            out.append((b"date", _clock.date()))
        out.append((b"x-request-id", stream.exchange.request.request_id.encode("ascii")))
        try:
            self.h2.send_headers(stream.stream_id, out, end_stream=end)
        except ProtocolError as exc:
            log.error("response head not sent on HTTP/2: %s", exc)
            stream.exchange.error = stream.exchange.error or f"invalid response head: {exc}"
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)
            self._complete(stream)
            return False
        return True

    def _send_local(self, stream: _Stream, response: Response) -> None:
        exchange = stream.exchange
        status = exchange.status = response.status
        headers = exchange.response_headers = response.headers
        try:
            stream.handler.on_response(exchange, status, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        stream.response_started = True
        out = stream.out
        if stream.grpc and not 200 <= status < 300:
            # A refusal of a gRPC call: the status in trailers only (gRPC over HTTP/2).
            fields = trailers_only(response, problem_message(response) or str(status))
            if self._send_head(stream, 200, fields, True):
                out.end = out.ended = True
            return
        body = response.body
        raw = [(k, v) for k, v in headers.raw() if k != b"content-length"]
        if status not in _NO_BODY_STATUS and not 100 <= status < 200:
            raw.append((b"content-length", b"%d" % len(body)))
        if not body or exchange.request.method == "HEAD" or status in _NO_BODY_STATUS:
            body = b""
        if not self._send_head(stream, status, raw, not body):
            return
        if not body:
            out.end = out.ended = True
            return
        exchange.bytes_out += len(body)
        out.push(body)
        out.finish()
        self._drain(stream)

    def _drain(self, stream: _Stream) -> None:
        """Send what the client's windows admit of the stream's response; pause the stream's
        upstream while they admit nothing, complete the exchange once all has gone."""
        if self._closed:
            return
        try:
            drained = stream.out.drain(self.h2, stream.stream_id)
        except ProtocolError as exc:
            log.debug("response body not sent: %s", exc)
            self._complete(stream)
            return
        conn = stream.upstream
        if not drained:
            if not stream.window_blocked:
                stream.window_blocked = True
                if conn is not None:
                    conn.pause_reading()
            return
        if stream.window_blocked:
            stream.window_blocked = False
            if conn is not None and not self._write_paused:
                conn.resume_reading()
        if stream.out.ended and stream.upstream is None and stream.stage != _DONE:
            self._complete(stream)

    def _acknowledge(self, stream: _Stream) -> None:
        """Reopen the client's window for the request bytes the stream has taken."""
        unacked, stream.unacked = stream.unacked, 0
        if unacked and not self._closed:
            self.h2.acknowledge_received_data(unacked, stream.stream_id)

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        stream.out = Outbound()
        stream.out.end = stream.out.ended = True
        if self._closed:
            return
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except ProtocolError:
            pass  # closed already

    def _fail(self, stream: _Stream, response: Response) -> None:
        """End a stream early with an error, whatever stage it reached."""
        exchange = stream.exchange
        exchange.error = exchange.error or response.body.decode(errors="replace")
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        stage = stream.stage
        if stage == _DONE:
            return
        if stream.response_started:
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)
            self._complete(stream)
        elif stage <= _DECIDING:
            stream.failure = response
            reading = stream.reading
            if reading is not None and reading.waiter is not None:
                self._body_failed(stream, RequestBodyError(response.status, _detail(response)))
        else:
            self._respond(stream, response)

    def _complete(self, stream: _Stream) -> None:
        if stream.stage == _DONE:
            return
        stream.stage = _DONE
        exchange = stream.exchange
        exchange.end = _now()
        try:
            stream.handler.on_complete(exchange)  # type: ignore[union-attr]
        except Exception:
            log.exception("log phase failed")
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        self.streams.pop(stream.stream_id, None)
        if not self._closed:
            if not stream.body_done or not stream.out.ended:
                # The request is not read whole (or the answer not sent): the client stops.
                code = ErrorCodes.NO_ERROR if stream.out.ended else ErrorCodes.CANCEL
                self._reset(stream, code)
            if stream.unacked:
                self._acknowledge(stream)
            self._flush_soon()
        if not self.streams:
            self._idle_since = self.loop.time()
            if self._going_away:
                self._close()
            else:
                self._schedule(self._idle_since + self.settings.idle_timeout)

    # the handler reads the request body

    def _body_read(self, stream: _Stream, reading: _BodyRead) -> bytes:
        buffered = stream.buffered
        if not buffered:
            body = b""
        elif len(buffered) == 1:
            body = buffered[0]
        else:
            body = b"".join(buffered)
            # Kept, joined, so that forwarding afterwards sends these bytes.
            stream.buffered = [body]
        reading.body = body
        return body

    def _body_failed(self, stream: _Stream, error: RequestBodyError) -> RequestBodyError:
        reading = stream.reading
        if reading is None:
            reading = stream.reading = _BodyRead(None, 0.0)
        reading.error = error
        exchange = stream.exchange
        exchange.error = exchange.error or error.detail
        stream.buffered, stream.buffered_size = None, 0
        self._acknowledge(stream)
        if stream.failure is None:
            stream.failure = _body_problem(error)
        waiter, reading.waiter = reading.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        return error

    # the connection's timer: every stream's deadline, and the connection's own

    def _set_deadline(self, stream: _Stream, deadline: float) -> None:
        stream.deadline = min(deadline, stream.grpc_deadline)
        self._schedule(stream.deadline)

    def _schedule(self, deadline: float) -> None:
        if deadline < self._timer_at and not self._closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = _INF

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self._closed:
            return
        now = self.loop.time()
        settings = self.settings
        if self._block_since and now - self._block_since >= settings.header_timeout:
            # A header block left unfinished (CONTINUATIONs trickling in, or none).
            self._abandon(ErrorCodes.PROTOCOL_ERROR, b"header block not completed in time")
            return
        nearest = self._block_since + settings.header_timeout if self._block_since else _INF
        for stream in list(self.streams.values()):
            if stream.deadline <= now:
                self._stream_late(stream, now)
            if stream.stage != _DONE:
                nearest = min(nearest, stream.deadline)
        if not self.streams and not self._block_since:
            wait = settings.idle_timeout if self._served else settings.header_timeout
            if now - self._idle_since >= wait:
                self._abandon(ErrorCodes.NO_ERROR, b"idle")
                return
            nearest = min(nearest, self._idle_since + wait)
        self._flush()
        if nearest < _INF:
            self._schedule(nearest)

    def _stream_late(self, stream: _Stream, now: float) -> None:
        stage = stream.stage
        if _CONNECTING <= stage < _DONE and now >= stream.grpc_deadline:
            self._deadline_exceeded(stream)
            return
        if stage <= _CONNECTING:
            reading = stream.reading
            if reading is not None and reading.waiter is not None:
                deadline = reading.last_at + self.settings.body_timeout
                if now < deadline:
                    stream.deadline = deadline
                    return
                silence = self.settings.body_timeout
                self._body_failed(
                    stream, RequestBodyError(408, f"no request body bytes for {silence}s")
                )
            stream.deadline = _INF
            return
        if stage == _WAITING:
            self._upstream_late(stream, now)
        elif stage == _STREAMING:
            self._upstream_stalled(stream, now)
        else:
            stream.deadline = _INF

    def _deadline_exceeded(self, stream: _Stream) -> None:
        exchange = stream.exchange
        exchange.error = "the gRPC deadline (grpc-timeout) passed"
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        if not stream.response_started:
            self._respond(stream, problem(504, "Gateway Timeout", exchange.error))
            return
        # The head went out: the status goes in trailers, after what is already queued.
        out = stream.out
        if not out.end:
            out.finish([(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded")])
        stream.deadline = _INF
        self._drain(stream)

    def _upstream_late(self, stream: _Stream, now: float) -> None:
        exchange = stream.exchange
        timeout = stream.response_timeout
        body_timeout = self.settings.body_timeout
        if not stream.body_done and exchange.bytes_in != stream.bytes_seen:
            # The request body is still flowing: the upstream is not late yet.
            stream.bytes_seen = exchange.bytes_in
            self._set_deadline(stream, now + min(timeout, body_timeout))
            return
        conn, stream.upstream = stream.upstream, None
        if conn is not None:
            conn.abort()
        if not stream.body_done and not stream.upstream_blocked:
            exchange.error = f"the request body stalled for {body_timeout}s"
            self._respond(stream, problem(408, "Request Timeout", exchange.error))
            return
        exchange.error = f"upstream sent no response within {timeout:g}s"
        if self._retry(stream, 504, exchange.error):
            return
        self._respond(stream, problem(504, "Gateway Timeout", exchange.error))

    def _upstream_stalled(self, stream: _Stream, now: float) -> None:
        conn = stream.upstream
        if conn is None:
            stream.deadline = _INF
            return
        timeout = stream.response_timeout
        # While paused by back pressure the upstream's silence is the client's doing.
        idle = 0.0 if conn.paused or stream.window_blocked else now - conn.last_activity
        if idle < timeout:
            self._set_deadline(stream, now + timeout - idle)
            return
        conn.abort()
        stream.upstream = None
        stream.exchange.error = f"upstream body stalled for {timeout:g}s"
        self._reset(stream, ErrorCodes.INTERNAL_ERROR)
        self._complete(stream)

    # writing and closing

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        transport = self.transport
        if transport is None or self._closed:
            return
        data = self.h2.data_to_send()
        if data:
            transport.write(data)

    def _flush_soon(self) -> None:
        """Write what h2 queued once the current callbacks are done: one write for many."""
        if self._flush_handle is None and not self._closed:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _goaway(self, code: ErrorCodes, debug: bytes = b"") -> None:
        if self._going_away and code == ErrorCodes.NO_ERROR:
            return
        self._going_away = True
        try:
            self.h2.close_connection(code, debug or None)
        except ProtocolError:
            pass

    def _abandon(self, code: ErrorCodes, debug: bytes) -> None:
        """End the connection now, GOAWAY first; open streams fail."""
        self._goaway(code, debug)
        self._flush()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._cancel_timer()
        self.server.connections.discard(self)
        transport = self.transport
        if transport is not None:
            transport.close()
