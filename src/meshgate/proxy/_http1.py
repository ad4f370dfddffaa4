"""HTTP/1.1, the client side: an asyncio protocol fed by httptools, one per connection.

Requests on a connection are served one at a time, in order; pipelined requests wait
in a queue with reading paused. Bodies stream straight between the two transports:
whichever side cannot keep up pauses reading on the other (``pause_writing``).

An exchange is driven by callbacks, not by a task: the handler's decision, the upstream
connection's events and one timer per connection move it from stage to stage. A task
exists only while something really waits: an asynchronous handler, or a new upstream
connection being opened.

A handler that needs the request body before it answers awaits ``Exchange.read_body``:
the body is then collected for it (no pause, bounded by its limit, watched by the body
timeout); a handler that does not call it costs nothing more.

An attempt that fails before the response head went out may be sent again, to the pool
the handler's optional ``retry`` chooses (see ``Handler``): the cycle goes back to
connecting, and the failed connection is aborted, never drained.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable
from email.utils import formatdate
from http import HTTPStatus
from random import getrandbits
from typing import TYPE_CHECKING

import httptools

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
from meshgate.proxy._path import BadTarget, split_target, target_authority
from meshgate.proxy._tls import TlsInfo
from meshgate.proxy._tunnel import Tunnel
from meshgate.proxy._upstream import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_NONE,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
)

if TYPE_CHECKING:
    from meshgate.proxy._server import Server

__all__ = ["HttpProtocol"]

log = logging.getLogger("meshgate.proxy")
# After an answer that left request bytes unread: how long and how much to drop.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
_now = time.perf_counter

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward; framing fields
# are regenerated, Expect is answered here, and the forwarding fields are set here.
_REQUEST_SKIP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"http2-settings",
    }
)
# Request fields the head parser looks at; every other field goes by with one lookup.
_REQUEST_SPECIAL = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"x-request-id",
        b"expect",
        b"connection",
        b"proxy-connection",
        b"upgrade",
    }
)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
# Fields a Connection header cannot remove: the engine reads them itself.
_KEEP_NAMED = frozenset({b"host", b"content-length", b"transfer-encoding"})
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,200}$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Below this size a body chunk is copied behind the held head into one buffer; above,
# both go to one writev without the copy.
_JOIN_LIMIT = 16384

# Reasons to stop reading from the client, as bits: any set keeps reading paused.
_PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
_PAUSE_QUEUE = 2  # a pipelined request waits for the one in front of it
_PAUSE_BUFFER = 4  # body bytes wait for the handler's decision
_PAUSE_UPGRADE = 8  # the upgrade request is being decided: what follows is not HTTP

# The stages of a cycle; each callback checks the stage it expects.
_NEW = 0  # parsed, not yet handed to the handler
_DECIDING = 1  # in the handler; only an asynchronous one stays here across callbacks
_CONNECTING = 2  # opening a new upstream connection
_WAITING = 3  # the request went upstream, its response head has not come back
_STREAMING = 4  # the response head is committed; the body flows
_DONE = 5  # on_complete ran


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Status\r\n".encode()


_COMMON_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_METHODS = {m.encode(): m for m in _COMMON_METHODS}
_METHOD_STARTS = {m: m.encode() + b" " for m in _COMMON_METHODS}


def _request_line_start(method: str) -> bytes:
    """``b"GET "`` for ``"GET"``: the method and its space, without encoding it each time."""
    start = _METHOD_STARTS.get(method)
    return start if start is not None else method.encode("ascii") + b" "


def _request_id() -> str:
    # 128 random bits from the process's PRNG, seeded from the OS at start and reseeded
    # in forked children: unique across workers and restarts, without a syscall each.
    return getrandbits(128).to_bytes(16).hex()


def _too_large(limit: int) -> RequestBodyError:
    return RequestBodyError(413, f"the request body exceeds {limit} bytes")


def _cut_short() -> ClientDisconnected:
    return ClientDisconnected(
        400, "the client closed the connection before the request body was complete"
    )


def _body_problem(error: RequestBodyError) -> Response:
    """The answer to a failed body read (a handler may raise a status of its own)."""
    title = _BODY_TITLES.get(error.status)
    if title is None:
        try:
            title = HTTPStatus(error.status).phrase
        except ValueError:
            title = "Error"
    return problem(error.status, title, error.detail)


_BODY_TITLES = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}


def _detail(response: Response) -> str:
    """The ``detail`` of a problem response, for the exception a body reader gets."""
    try:
        return str(json.loads(response.body).get("detail") or response.status)
    except (ValueError, AttributeError):
        return response.body.decode(errors="replace")


class _Clock:
    """The Date header value, computed at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_clock = _Clock()


class _HeaderTooLarge(Exception):
    pass


class _BodyRead:
    """A handler's read of the whole request body (``Exchange.read_body``): made on demand."""

    __slots__ = ("limit", "waiter", "last_at", "body", "error")

    def __init__(self, limit: int | None, now: float) -> None:
        self.limit = limit
        self.waiter: asyncio.Future[bytes] | None = None
        self.last_at = now  # the last body bytes (or the start): the body timeout counts from it
        self.body: bytes | None = None
        self.error: RequestBodyError | None = None


class _Cycle:
    """One request on a connection, from its head to the last byte of its response."""

    __slots__ = (
        "exchange",
        "handler",
        "stage",
        "keep_alive",
        "expect_continue",
        "body_done",
        "buffered",
        "buffered_size",
        "upstream",
        "upstream_chunked",
        "upstream_reusable",
        "response_started",
        "response_chunked",
        "held",
        "failure",
        "retry_allowed",
        "bytes_seen",
        "reading",
        "early",
        "body_at",
        "body_by",
        "response_timeout",
    )

    def __init__(
        self, exchange: Exchange, keep_alive: bool, expect_continue: bool, body_done: bool
    ) -> None:
        self.exchange = exchange
        self.handler: Handler | None = None
        self.stage = _NEW
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body_done = body_done
        self.buffered: list[bytes] | None = None
        self.buffered_size = 0
        self.upstream: UpstreamConnection | None = None
        self.upstream_chunked = False
        self.upstream_reusable = False
        # True once a response head is committed: written, or held to leave with the body.
        self.response_started = False
        self.response_chunked = False
        self.held: bytes | None = None
        self.failure: Response | None = None
        self.retry_allowed = False
        self.bytes_seen = 0
        self.reading: _BodyRead | None = None
        # Bytes the client sent after an upgrade request's head: held until the upstream
        # switches protocols (forwarded earlier, an upstream that refuses would parse them).
        self.early = b""
        # The last request body bytes (loop time), and when the whole body must be in.
        self.body_at = 0.0
        self.body_by = 0.0
        # The attempt's response timeout: the exchange's own, else its pool's.
        self.response_timeout = 0.0


class HttpProtocol(asyncio.Protocol):
    """Serves one client connection."""

    __slots__ = (
        "server",
        "settings",
        "loop",
        "transport",
        "parser",
        "client_ip",
        "_client_ip",
        "_url",
        "_headers",
        "_header_size",
        "_in_head",
        "_head_bytes",
        "_parsing",
        "_current",
        "_queue",
        "_paused",
        "_write_paused",
        "_eof",
        "_closed",
        "_pending_error",
        "_hold",
        "_timer",
        "_timer_at",
        "_deadline",
        "_idle",
        "_lingered",
        "tls",
        "_preface",
        "_tunnel",
        "_write_paused_at",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.settings
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self._client_ip = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._in_head = False
        self._head_bytes = 0
        self._parsing: _Cycle | None = None
        self._current: _Cycle | None = None
        self._queue: deque[_Cycle] = deque()
        self._paused = 0
        self._write_paused = False
        self._eof = False
        self._closed = False
        self._pending_error: Response | None = None
        # Set while a callback may start cycles: they start once it unwinds, in a loop,
        # never by recursion.
        self._hold = False
        # One timer per connection. It fires no later than the deadline of whatever
        # stage the connection is in, checks that stage, and re-arms; moving a deadline
        # later costs nothing (see _arm).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._idle = False  # between requests: the deadline closes silently, no 408
        self._lingered = 0
        self.tls: TlsInfo | None = None
        # The first bytes of a cleartext connection, while they may be the HTTP/2 preface.
        self._preface: bytes | None = None
        self._tunnel: Tunnel | None = None
        self._write_paused_at = 0.0

    # connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            tls = self.tls = TlsInfo.of(ssl_object)
            h2 = self.server.h2
            if tls.alpn == "h2" and h2 is not None:
                h2(self.server, transport, b"")  # type: ignore[arg-type]
                return
        elif self.server.h2 is not None:
            self._preface = b""
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self._client_ip = self.client_ip.encode("ascii")
        self.server.connections.add(self)
        self._deadline = self.loop.time() + self.settings.header_timeout
        self._arm(self._deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        cycle = self._current
        if cycle is None:
            return
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None and not conn.closed:
            conn.abort()
        cycle.exchange.error = cycle.exchange.error or "client closed the connection"
        reading = cycle.reading
        if reading is not None and reading.waiter is not None:
            self._body_failed(cycle, _cut_short())
        # A running handler completes the exchange when it returns.
        if cycle.stage >= _CONNECTING:
            self._complete(cycle)

    def data_received(self, data: bytes) -> None:
        if self._preface is not None:
            data = self._prior_knowledge(data)
            if not data:
                return
        if self._closed:
            # Lingering after an answer that left the request unread: drop what comes.
            self._lingered += len(data)
            if self._lingered > _LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        in_head = self._in_head
        self._hold = True
        try:
            self._feed(data, in_head)
        finally:
            self._hold = False
        cycle = self._current
        if cycle is not None and cycle.stage == _NEW and not self._closed:
            # Started once the whole read is parsed: body bytes that came with the head
            # are buffered by now, so they leave with it, and a local answer finds the
            # body complete and keeps the connection.
            self._begin(cycle)

    def _prior_knowledge(self, data: bytes) -> bytes:
        """The bytes to parse as HTTP/1.1, or b"" once the connection went to HTTP/2."""
        seen = (self._preface or b"") + data
        self._preface = None
        if _H2_PREFACE.startswith(seen[:24]):
            if len(seen) < len(_H2_PREFACE):
                self._preface = seen  # a preface in pieces: wait for the rest
                return b""
            self.server.connections.discard(self)
            self._cancel_timer()
            self._closed = True
            h2 = self.server.h2
            assert h2 is not None and self.transport is not None
            h2(self.server, self.transport, seen)
            return b""
        return seen

    def _feed(self, data: bytes, in_head: bool) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The parser stops after the head of an upgrade (or CONNECT) request; nothing
            # after it on this connection is parsed as HTTP.
            cycle = self._queue[-1] if self._queue else self._current
            self._parsing = None
            request = cycle.exchange.request if cycle is not None else None
            if request is not None and request.upgrade:
                if cycle.failure is None:  # type: ignore[union-attr]
                    cycle.early = data[exc.args[0] :]  # type: ignore[union-attr]
                    self._pause(_PAUSE_UPGRADE)
                    return
                refusal = cycle.failure  # type: ignore[union-attr]
            elif request is not None and request.method != "CONNECT":
                # An upgrade that is not forwarded (h2c, say): served as a plain request,
                # its Upgrade field dropped as hop-by-hop; what follows is parsed as HTTP.
                rest = data[exc.args[0] :]
                if rest:
                    self._feed(rest, self._in_head)
                return
            else:
                refusal = problem(501, "Not Implemented", "CONNECT is not served")
            self._pause(_PAUSE_QUEUE)
            if cycle is None:
                self._write_error_and_close(refusal)
            else:
                self._fail(cycle, refusal)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeaderTooLarge):
                self._parse_failed(self._head_too_large())
            else:
                log.exception("parser callback failed", exc_info=exc.__context__)
                self._parse_failed(problem(500, "Internal Server Error"))
        except httptools.HttpParserError as exc:
            reason = str(exc) or "malformed request"
            self._parse_failed(problem(400, "Bad Request", f"malformed HTTP/1.1: {reason}"))
        else:
            if in_head and self._in_head:
                # httptools holds a field until its line ends, out of on_header's sight:
                # bound the bytes of a head that spans reads.
                self._head_bytes += len(data)
                if self._head_bytes > self.settings.max_header_size:
                    self._in_head = False
                    self._parse_failed(self._head_too_large())

    def _head_too_large(self) -> Response:
        return problem(
            431,
            "Request Header Fields Too Large",
            f"the request head exceeds {self.settings.max_header_size} bytes",
        )

    def eof_received(self) -> bool | None:
        if self._closed:
            return False
        # A half-closed client may still read the responses it is waiting for.
        self._eof = True
        cycle = self._current
        if cycle is None:
            return False
        reading = cycle.reading
        if reading is not None and reading.waiter is not None:
            self._body_failed(cycle, _cut_short())
        elif not cycle.body_done and self._parsing is cycle:
            # The body can never be complete: free the upstream connection now.
            self._parsing = None
            self._fail(cycle, _body_problem(_cut_short()))
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = now = self.loop.time()
        # The client has that long to read again (send timeout).
        deadline = now + self.settings.send_timeout
        cycle = self._current
        if cycle is not None and cycle.stage == _STREAMING and deadline < self._deadline:
            self._deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        cycle = self._current
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.resume_reading()

    # parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_size = 0
        self._in_head = True
        self._head_bytes = 0
        if self._current is None:
            # First byte of a new request: the idle deadline becomes the header deadline.
            self._idle = False
            deadline = self._deadline = self.loop.time() + self.settings.header_timeout
            if self._timer is None or deadline < self._timer_at:
                self._arm(deadline)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_size += len(url)
        if self._header_size > self.settings.max_header_size:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.settings.max_header_size:
            raise _HeaderTooLarge
        if self._in_head:  # not a chunked body's trailer: those are dropped
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        headers = self._headers
        content_length: int | None = None
        chunked = False
        host = b""
        hosts = 0
        request_id = b""
        expect = False
        connection = False
        upgrade = b""
        nominated: set[bytes] | None = None
        failure: Response | None = None
        for name, value in headers:
            if name not in _REQUEST_SPECIAL:
                continue
            if name == b"content-length":
                if content_length is not None:
                    failure = problem(400, "Bad Request", "more than one Content-Length field")
                content_length = int(value)
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    failure = problem(
                        501, "Not Implemented", "only Transfer-Encoding: chunked is supported"
                    )
                chunked = True
            elif name == b"host":
                host = value
                hosts += 1
            elif name == b"x-request-id":
                request_id = value
            elif name == b"expect":
                if value.lower() == b"100-continue":
                    expect = True
                else:
                    failure = problem(417, "Expectation Failed", "only 100-continue is supported")
            elif name == b"upgrade":
                upgrade = value
            else:
                connection = True
                if name == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    # Connection nominates more hop-by-hop fields.
                    nominated = (nominated or set()) | {
                        t.strip().lower() for t in value.split(b",")
                    }
        if nominated:
            # Dropped from the client's fields now, before any policy runs: a client cannot
            # name a field that a policy sets and have it removed on the way out.
            headers[:] = [f for f in headers if f[0] not in nominated or f[0] in _KEEP_NAMED]
        keep_alive = parser.should_keep_alive()
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0, and of those keeps only 1.1 alive
        # without a (Proxy-)Connection field: then the version is known without asking
        # the parser, which formats a new string on each call.
        version = "1.1" if keep_alive and not connection else parser.get_http_version()
        if chunked and (content_length is not None or version == "1.0"):
            # RFC 9112 6.1: either way the framing is ambiguous; refuse, then close.
            failure = problem(
                400,
                "Bad Request",
                "ambiguous framing: Transfer-Encoding with Content-Length or in HTTP/1.0",
            )
        elif version != "1.1" and version != "1.0":
            failure = failure or problem(
                505, "HTTP Version Not Supported", "only HTTP/1.1 and 1.0 are served"
            )
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            failure = failure or problem(400, "Bad Request", "exactly one Host field is required")
        url = self._url
        try:
            path, query = split_target(url)
        except BadTarget as exc:
            path, query = "/", ""
            failure = failure or problem(400, "Bad Request", str(exc))
        else:
            if url[0] != 0x2F:  # absolute form: its authority overrides Host
                host = target_authority(url) or host
        rid = request_id.decode() if request_id and _REQUEST_ID.match(request_id) else _request_id()
        method = parser.get_method()
        # Only WebSocket is tunnelled; the test of ``upgrade`` first keeps this free for the
        # requests that ask for nothing.
        if (
            upgrade
            and upgrade.lower() == b"websocket"
            and method != b"CONNECT"
            and parser.should_upgrade()
        ):
            if chunked or content_length or version != "1.1":
                failure = failure or problem(
                    400, "Bad Request", "an upgrade request must be HTTP/1.1 without a body"
                )
            keep_alive = False  # after an upgrade request the connection is not HTTP
        else:
            upgrade = b""
        request = Request(
            _METHODS.get(method) or method.decode("ascii"),
            url,
            path,
            query,
            wrap_headers(headers),
            version,
            self.client_ip,
            self.settings.scheme,
            host.decode("latin-1"),
            content_length,
            chunked,
            rid,
            self.tls,
            upgrade.decode("latin-1") if upgrade else None,
        )
        body_done = not (chunked or content_length)
        cycle = _Cycle(
            Exchange(request, _now()),
            keep_alive and not self.server.draining,
            expect and version == "1.1",
            body_done,
        )
        if failure is not None:
            cycle.failure = failure
            cycle.keep_alive = False
        if body_done:
            self._parsing = None
        else:
            now = self.loop.time()
            cycle.body_at = now
            cycle.body_by = now + self.settings.body_total_timeout
            self._parsing = cycle
            # Only a request with a body has one to read (``Exchange.read_body``).
            cycle.exchange._body_source = self
        if self._current is None:
            self._current = cycle  # started by data_received once this read is parsed
        else:
            self._queue.append(cycle)
            self._pause(_PAUSE_QUEUE)

    def on_body(self, body: bytes) -> None:
        cycle = self._parsing
        if cycle is None:
            return
        exchange = cycle.exchange
        exchange.bytes_in += len(body)
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            self._parsing = None
            self._fail(
                cycle,
                problem(413, "Content Too Large", f"the request body exceeds {limit} bytes"),
            )
            return
        conn = cycle.upstream
        cycle.body_at = self.loop.time()
        if conn is not None:
            if cycle.upstream_chunked:
                conn.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                conn.write(body)
            return
        if cycle.buffered is None:
            cycle.buffered = [body]
        else:
            cycle.buffered.append(body)
        cycle.buffered_size += len(body)
        reading = cycle.reading
        if reading is not None:
            # The handler is consuming the body: no pause; its limit bounds the buffer.
            limit = reading.limit
            if limit is not None and cycle.buffered_size > limit:
                self._body_failed(cycle, _too_large(limit))
            else:
                reading.last_at = self.loop.time()
            return
        if cycle.buffered_size > 262144:
            self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        cycle = self._parsing
        if cycle is None:
            return
        self._parsing = None
        cycle.body_done = True
        conn = cycle.upstream
        if conn is not None:
            if cycle.upstream_chunked:
                conn.write(b"0\r\n\r\n")
            if cycle.stage == _WAITING:
                # The response timeout counts from the end of the request.
                deadline = self.loop.time() + cycle.response_timeout
                self._deadline = deadline
                if self._timer is None or deadline < self._timer_at:
                    self._arm(deadline)
            return
        reading = cycle.reading
        if reading is not None and reading.waiter is not None:
            waiter, reading.waiter = reading.waiter, None
            body = self._body_read(cycle, reading)
            if not waiter.done():
                waiter.set_result(body)

    # the handler reads the request body (Exchange.read_body)

    def request_body(self, exchange: Exchange, limit: int | None) -> bytes | Awaitable[bytes]:
        """The whole body of the request being decided: the bytes, or a future of them."""
        cycle = self._current
        if cycle is None or cycle.exchange is not exchange or cycle.stage != _DECIDING:
            raise RuntimeError("read_body() is for the handler, before it answers")
        reading = cycle.reading
        if reading is not None:
            if reading.error is not None:
                raise reading.error
            if reading.body is not None:
                return reading.body
            raise RuntimeError("read_body() is already waiting for this request's body")
        failure = cycle.failure
        if failure is not None:
            # The request failed while the handler decided (a malformed chunk, say).
            raise self._body_failed(cycle, RequestBodyError(failure.status, _detail(failure)))
        most = exchange.max_body_size
        if most is not None and (limit is None or most < limit):
            limit = most
        reading = cycle.reading = _BodyRead(limit, self.loop.time())
        if limit is not None:
            length = exchange.request.content_length
            if exchange.bytes_in > limit or (length is not None and length > limit):
                raise self._body_failed(cycle, _too_large(limit))
        if cycle.body_done:
            return self._body_read(cycle, reading)
        if self._closed or self._eof:
            raise self._body_failed(cycle, _cut_short())
        if cycle.expect_continue:
            cycle.expect_continue = False
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]
        if self._paused:
            self._resume(_PAUSE_BUFFER)
        waiter = reading.waiter = self.loop.create_future()
        deadline = self._deadline = reading.last_at + self.settings.body_timeout
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        return waiter

    def _body_read(self, cycle: _Cycle, reading: _BodyRead) -> bytes:
        buffered = cycle.buffered
        if not buffered:
            body = b""
        elif len(buffered) == 1:
            body = buffered[0]
        else:
            body = b"".join(buffered)
            # Kept, joined, so that forwarding afterwards sends these bytes.
            cycle.buffered = [body]
        reading.body = body
        return body

    def _body_failed(self, cycle: _Cycle, error: RequestBodyError) -> RequestBodyError:
        """End the handler's body read with ``error``: the engine answers its status, closes."""
        reading = cycle.reading
        if reading is None:
            reading = cycle.reading = _BodyRead(None, 0.0)
        reading.error = error
        exchange = cycle.exchange
        exchange.error = exchange.error or error.detail
        cycle.keep_alive = False
        cycle.buffered, cycle.buffered_size = None, 0
        if self._parsing is cycle:
            self._parsing = None  # the rest of this body is dropped as it arrives
        if cycle.failure is None:
            cycle.failure = _body_problem(error)
        waiter, reading.waiter = reading.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        return error

    def _body_late(self, cycle: _Cycle, reading: _BodyRead) -> None:
        timeout = self.settings.body_timeout
        now = self.loop.time()
        if cycle.body_by and now >= cycle.body_by:
            total = self.settings.body_total_timeout
            reason = f"the request body was not complete within {total}s"
            self._body_failed(cycle, RequestBodyError(408, reason))
            return
        deadline = reading.last_at + timeout
        if now < deadline:
            self._deadline = min(deadline, cycle.body_by) if cycle.body_by else deadline
            self._arm(self._deadline)
            return
        self._body_failed(cycle, RequestBodyError(408, f"no request body bytes for {timeout}s"))

    # serving: handler -> local response, or upstream -> response head -> body -> done

    def _begin(self, cycle: _Cycle) -> None:
        """Make ``cycle`` current and serve it, then any queued cycle it leads to."""
        self._current = cycle
        if self._hold:
            return
        self._hold = True
        try:
            while True:
                self._serve(cycle)
                following = self._current
                if following is None or following.stage != _NEW or self._closed:
                    break
                cycle = following
        finally:
            self._hold = False

    def _serve(self, cycle: _Cycle) -> None:
        if not cycle.body_done:
            # Time a pipelined request waited behind another one, reading paused, is not
            # the client's silence.
            now = self.loop.time()
            cycle.body_at = now
            cycle.body_by = now + self.settings.body_total_timeout
        handler = cycle.handler = self.server.handler
        if cycle.failure is not None:
            self._respond(cycle, cycle.failure)
            return
        cycle.stage = _DECIDING
        exchange = cycle.exchange
        try:
            decision = handler.handle(exchange)
        except Exception:
            decision = self._handler_failed(exchange)
        if decision is None or isinstance(decision, Response):
            self._decided(cycle, decision)
        else:
            self.loop.create_task(self._decide_later(cycle, decision))

    async def _decide_later(self, cycle: _Cycle, decision: Awaitable[Response | None]) -> None:
        try:
            response = await decision
        except RequestBodyError as exc:
            # Answered by the engine (cycle.failure), as read_body said: not a handler bug.
            response = _body_problem(exc)
        except Exception:
            response = self._handler_failed(cycle.exchange)
        reading = cycle.reading
        if reading is not None and reading.waiter is not None:
            # The handler answered without waiting for the body read it started (only an
            # asynchronous one can start a read).
            waiter, reading.waiter = reading.waiter, None
            waiter.cancel()
            cycle.reading = None
        self._decided(cycle, response)

    def _handler_failed(self, exchange: Exchange) -> Response:
        request = exchange.request
        log.exception("handler failed on %s %s", request.method, request.path)
        return problem(500, "Internal Server Error", "the gateway failed on this request")

    def _decided(self, cycle: _Cycle, response: Response | None) -> None:
        if cycle.failure is not None:
            response = cycle.failure
        elif response is None:
            if self._closed:
                self._complete(cycle)
                return
            if cycle.exchange.upstream is not None:
                self._forward(cycle)
                return
            response = problem(500, "Internal Server Error", "no upstream chosen")
        self._respond(cycle, response)

    def _respond(self, cycle: _Cycle, response: Response) -> None:
        if not self._closed and not cycle.response_started:
            self._send_local(cycle, response)
        self._complete(cycle)

    def _complete(self, cycle: _Cycle) -> None:
        if cycle.stage == _DONE:
            return
        cycle.stage = _DONE
        exchange = cycle.exchange
        exchange.end = _now()
        try:
            cycle.handler.on_complete(exchange)  # type: ignore[union-attr]
        except Exception:
            log.exception("log phase failed")
        self._finish(cycle)

    def _forward(self, cycle: _Cycle) -> None:
        exchange = cycle.exchange
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            # Bytes that arrived with the head were read before the handler set the limit.
            self._respond(
                cycle, problem(413, "Content Too Large", f"the request body exceeds {limit} bytes")
            )
            return
        try:
            pool: UpstreamPool = exchange.upstream
            exchange.upstream_start = _now()
            exchange.attempts += 1
            cycle.retry_allowed = not exchange.request.has_body
            conn = pool.take_idle()
            if conn is None:
                cycle.stage = _CONNECTING
                self.loop.create_task(self._connect(cycle, pool))
            else:
                self._send_request(cycle, conn)
        except Exception:
            self._forward_failed(cycle)

    async def _connect(self, cycle: _Cycle, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect()
        except Exception as exc:
            if cycle.stage != _CONNECTING:
                return
            if not isinstance(exc, UpstreamError):
                self._forward_failed(cycle)
                return
            cycle.exchange.error = cycle.exchange.error or str(exc)
            if self._retry(cycle, exc.status, str(exc)):
                return
            if exc.status == 503:
                self._respond(cycle, problem(503, "Service Unavailable", str(exc)))
            else:
                self._respond(cycle, problem(502, "Bad Gateway", str(exc)))
            return
        if cycle.stage != _CONNECTING or self._closed:
            # The client went away, or its request failed, while we connected.
            pool.release(conn)
            return
        try:
            self._send_request(cycle, conn)
        except Exception:
            self._forward_failed(cycle)

    def _forward_failed(self, cycle: _Cycle) -> None:
        """Called from an ``except`` block: an UpstreamError says why, anything else is a bug."""
        exc = sys.exc_info()[1]
        detail = "the gateway failed to forward"
        if isinstance(exc, UpstreamError):
            detail = cycle.exchange.error = str(exc)
        else:
            log.exception("forwarding failed")
        cycle.keep_alive = False
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        if cycle.response_started and self.transport is not None:
            self.transport.abort()
        self._respond(cycle, problem(502, "Bad Gateway", detail))

    def _retry(self, cycle: _Cycle, status: int, error: str | None) -> bool:
        """Offer the failed attempt to the handler's ``retry``; True when it is sent again.

        Only before a response byte went out, and only for a request that can be sent
        again whole: no body, or one the handler read (the engine still holds it).
        """
        retry = retry_hook(cycle.handler)  # type: ignore[arg-type]
        if retry is None or self._closed or cycle.response_started or not cycle.body_done:
            return False
        exchange = cycle.exchange
        reading = cycle.reading
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
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        cycle.stage = _CONNECTING  # deaf to the old connection's events from here on
        exchange.error = None
        if reading is not None and reading.body:
            cycle.buffered, cycle.buffered_size = [reading.body], len(reading.body)
        if self._paused:
            self._resume(_PAUSE_UPSTREAM)  # that attempt's back pressure went with it
        # Sent once the callback that failed has unwound (it may be the old parser's).
        self.loop.call_soon(self._attempt_again, cycle)
        return True

    def _attempt_again(self, cycle: _Cycle) -> None:
        if cycle.stage == _CONNECTING and cycle.upstream is None and not self._closed:
            self._forward(cycle)

    def _send_request(self, cycle: _Cycle, conn: UpstreamConnection) -> None:
        exchange = cycle.exchange
        request = exchange.request
        pool = conn.pool
        cycle.upstream = conn
        cycle.stage = _WAITING
        conn.begin(self, request.method == "HEAD", request.upgrade is not None)
        if self._write_paused:
            conn.pause_reading()
        head = self._request_head(cycle, exchange, pool.host_header)
        if cycle.expect_continue and not cycle.body_done:
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]
        buffered = cycle.buffered
        if buffered:
            cycle.buffered, cycle.buffered_size = None, 0
            if cycle.upstream_chunked:
                out = [head]
                for chunk in buffered:
                    out += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            else:
                out = [head, *buffered]
            if cycle.body_done and cycle.upstream_chunked:
                out.append(b"0\r\n\r\n")
            conn.writelines(out)
        elif cycle.body_done and cycle.upstream_chunked:
            conn.write(head + b"0\r\n\r\n")
        else:
            conn.write(head)
        if self._paused:
            self._resume(_PAUSE_BUFFER)
        wait = exchange.timeout
        if wait is None:
            wait = pool.response_timeout
        cycle.response_timeout = wait
        if wait < self.server.min_span:
            self.server.min_span = wait
        deadline = self.loop.time() + wait
        if not cycle.body_done:
            deadline = min(deadline, cycle.body_at + self.settings.body_timeout, cycle.body_by)
        self._deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _request_head(self, cycle: _Cycle, exchange: Exchange, host_header: bytes) -> bytes:
        request = exchange.request
        skip = _REQUEST_SKIP
        parts = [
            _request_line_start(request.method),
            exchange.upstream_target.encode("latin-1"),
            b" HTTP/1.1\r\nhost: ",
            host_header,
            b"\r\n",
        ]
        xff = b""
        for name, value in request.headers.raw():
            if name not in skip:
                parts += (name, b": ", value, b"\r\n")
            elif name == b"x-forwarded-for":
                xff += value + b", "
        client_ip = request.client_ip
        parts += (
            b"x-forwarded-for: ",
            xff,
            self._client_ip if client_ip is self.client_ip else client_ip.encode("ascii"),
            b"\r\nx-forwarded-proto: ",
            request.scheme.encode("ascii"),
            b"\r\nx-request-id: ",
            request.request_id.encode("ascii"),
            b"\r\n",
        )
        if request.host:
            parts += (b"x-forwarded-host: ", request.host.encode("latin-1"), b"\r\n")
        if request.upgrade is not None:
            parts += (
                b"connection: upgrade\r\nupgrade: ",
                request.upgrade.encode("latin-1"),
                b"\r\n",
            )
        if request.chunked:
            cycle.upstream_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif request.content_length is not None:
            parts.append(b"content-length: %d\r\n\r\n" % request.content_length)
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    # upstream events (this protocol is the sink of the current cycle's connection)

    def upstream_head(
        self, status: int, raw: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None:
        cycle = self._current
        if cycle is None or cycle.stage != _WAITING:
            return
        exchange = cycle.exchange
        statuses = exchange.retry_statuses
        if statuses is not None and status in statuses and self._retry(cycle, status, None):
            return
        cycle.stage = _STREAMING
        exchange.status = status
        exchange.upstream_headers_at = _now()
        cycle.upstream_reusable = keep_alive
        headers = exchange.response_headers = wrap_headers(raw)
        try:
            cycle.handler.on_response(exchange, status, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        if framing == FRAMING_CHUNKED or framing == FRAMING_CLOSE:
            if exchange.request.http_version == "1.1":
                cycle.response_chunked = True
                headers.raw().append((b"transfer-encoding", b"chunked"))
            else:
                cycle.keep_alive = False
        # Held until the first body bytes or the end of this read from the upstream.
        cycle.held = self._response_head(cycle, status, headers.raw())
        cycle.response_started = True
        if framing != FRAMING_NONE:
            conn = cycle.upstream
            assert conn is not None
            deadline = self._deadline = conn.last_activity + cycle.response_timeout
            if self._timer is None or deadline < self._timer_at:
                self._arm(deadline)

    def upstream_body(self, data: bytes) -> None:
        cycle = self._current
        transport = self.transport
        if cycle is None or transport is None:
            return
        size = len(data)
        cycle.exchange.bytes_out += size
        held = cycle.held
        if held is None:
            if cycle.response_chunked:
                transport.writelines((b"%x\r\n" % size, data, b"\r\n"))
            else:
                transport.write(data)
            return
        cycle.held = None
        if cycle.response_chunked:
            if size < _JOIN_LIMIT:
                transport.write(b"".join((held, b"%x\r\n" % size, data, b"\r\n")))
            else:
                transport.writelines((held, b"%x\r\n" % size, data, b"\r\n"))
        elif size < _JOIN_LIMIT:
            transport.write(held + data)
        else:
            transport.writelines((held, data))

    def upstream_flush(self) -> None:
        cycle = self._current
        if cycle is not None and cycle.held is not None and self.transport is not None:
            held, cycle.held = cycle.held, None
            self.transport.write(held)

    def upstream_done(self) -> None:
        cycle = self._current
        if cycle is None or cycle.stage != _STREAMING:
            return
        held, cycle.held = cycle.held, None
        transport = self.transport
        if transport is not None:
            if cycle.response_chunked:
                transport.write(b"0\r\n\r\n" if held is None else held + b"0\r\n\r\n")
            elif held is not None:
                transport.write(held)
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            if cycle.upstream_reusable and cycle.body_done and not conn.closed:
                conn.resume_reading()  # paused by the client's back pressure, now idle
                conn.pool.release(conn)
            else:
                conn.close()
        self._complete(cycle)

    def upstream_lost(self, exc: Exception | None) -> None:
        cycle = self._current
        if cycle is None:
            return
        stage = cycle.stage
        if stage != _WAITING and stage != _STREAMING:
            return
        conn, cycle.upstream = cycle.upstream, None
        exchange = cycle.exchange
        exchange.error = str(exc) if exc else "upstream closed the connection"
        if stage == _WAITING:
            if conn is not None and conn.reused and cycle.retry_allowed:
                # The upstream closed a reused connection before answering: it was stale.
                cycle.retry_allowed = False
                cycle.stage = _CONNECTING
                self.loop.create_task(self._connect(cycle, conn.pool))
                return
            if self._retry(cycle, 502, exchange.error):
                return
            self._respond(cycle, problem(502, "Bad Gateway", exchange.error))
            return
        # The response is cut short: the client must see a broken connection, not a
        # complete-looking truncated body.
        cycle.keep_alive = False
        cycle.held = None
        if self.transport is not None:
            self.transport.abort()
        self._complete(cycle)

    def upstream_switched(
        self, raw: list[tuple[bytes, bytes]], protocol: bytes, rest: bytes
    ) -> None:
        """The upstream answered 101: pass it on, and make both connections one tunnel."""
        cycle = self._current
        conn = cycle.upstream if cycle is not None else None
        if cycle is None or cycle.stage != _WAITING or conn is None or self.transport is None:
            return
        cycle.upstream = None
        cycle.stage = _STREAMING
        cycle.response_started = True
        exchange = cycle.exchange
        exchange.status = 101
        exchange.upstream_headers_at = _now()
        headers = exchange.response_headers = wrap_headers(raw)
        try:
            cycle.handler.on_response(exchange, 101, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        parts = [_status_line(101)]
        for name, value in headers.raw():
            parts += (name, b": ", value, b"\r\n")
        parts += (b"connection: upgrade\r\nupgrade: ", protocol, b"\r\n\r\n")
        self.transport.write(b"".join(parts))
        self._cancel_timer()
        assert conn.transport is not None
        tunnel = self._tunnel = Tunnel(
            self.transport,
            conn.transport,
            self.settings.tunnel_idle_timeout,
            self.loop,
            lambda up, down, error: self._tunnel_closed(cycle, conn, up, down, error),
        )
        tunnel.send_client(rest)
        early, cycle.early = cycle.early, b""
        tunnel.send_upstream(early)
        self._paused = 0
        self.transport.resume_reading()
        if conn.paused:
            conn.transport.resume_reading()

    def _tunnel_closed(
        self,
        cycle: _Cycle,
        conn: UpstreamConnection,
        up: int,
        down: int,
        error: str | None,
    ) -> None:
        conn.uncount()
        self._tunnel = None
        self._closed = True
        self.server.connections.discard(self)
        exchange = cycle.exchange
        exchange.bytes_in += up
        exchange.bytes_out += down
        if error is not None:
            exchange.error = exchange.error or error
        self._complete(cycle)

    def upstream_pause(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    # responses

    def _response_head(
        self, cycle: _Cycle, status: int, fields: list[tuple[bytes, bytes]]
    ) -> bytes:
        request = cycle.exchange.request
        parts = [_status_line(status)]
        dated = False
        for name, value in fields:
            if name == b"date":
                dated = True
            parts += (name, b": ", value, b"\r\n")
        if not dated:
            parts += (b"date: ", _clock.date(), b"\r\n")
        parts += (b"x-request-id: ", request.request_id.encode("ascii"))
        if not cycle.keep_alive or self.server.draining:
            cycle.keep_alive = False
            parts.append(b"\r\nconnection: close\r\n\r\n")
        elif request.http_version == "1.0":
            parts.append(b"\r\nconnection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n\r\n")
        return b"".join(parts)

    def _send_local(self, cycle: _Cycle, response: Response) -> None:
        exchange = cycle.exchange
        status = exchange.status = response.status
        headers = exchange.response_headers = response.headers
        try:
            cycle.handler.on_response(exchange, status, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        body = response.body
        if status != 204 and status != 304 and not (100 <= status < 200):
            headers.set("content-length", str(len(body)))
        if not cycle.body_done:
            # The rest of the request body will not be read: the connection cannot be reused.
            cycle.keep_alive = False
        head = self._response_head(cycle, status, headers.raw())
        cycle.response_started = True
        if body and exchange.request.method != "HEAD":
            exchange.bytes_out += len(body)
            head += body
        self.transport.write(head)  # type: ignore[union-attr]

    def _fail(self, cycle: _Cycle, response: Response) -> None:
        """End an exchange early with an error, whatever stage it reached."""
        cycle.keep_alive = False
        cycle.exchange.error = cycle.exchange.error or response.body.decode(errors="replace")
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        stage = cycle.stage
        if stage == _DONE:
            return
        if cycle.response_started:
            cycle.held = None
            if self.transport is not None:
                self.transport.abort()
            self._complete(cycle)
        elif stage <= _DECIDING:
            # The handler has not decided yet: its decision is replaced by this one.
            cycle.failure = response
            reading = cycle.reading
            if reading is not None and reading.waiter is not None:
                self._body_failed(cycle, RequestBodyError(response.status, _detail(response)))
        else:
            self._respond(cycle, response)

    def _parse_failed(self, response: Response) -> None:
        # The bad bytes belong to the request whose body is being read, else to a new
        # request: requests received before it are still answered, in order.
        cycle, self._parsing = self._parsing, None
        self._pause(_PAUSE_QUEUE)
        if cycle is not None and cycle is self._current:
            self._fail(cycle, response)
        elif self._current is not None:
            if cycle is not None:
                self._queue.remove(cycle)
            self._pending_error = response
        else:
            self._write_error_and_close(response)

    def _write_error_and_close(self, response: Response, linger: bool = True) -> None:
        if self.transport is None or self._closed:
            return
        head = [_status_line(response.status)]
        for name, value in response.headers.raw():
            head += (name, b": ", value, b"\r\n")
        head += (
            b"content-length: ",
            str(len(response.body)).encode(),
            b"\r\n",
            b"date: ",
            _clock.date(),
            b"\r\nconnection: close\r\n\r\n",
            response.body,
        )
        self.transport.write(b"".join(head))
        self._close(linger=linger)

    def _finish(self, cycle: _Cycle) -> None:
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        self._current = None
        if self._closed:
            return
        if not cycle.keep_alive or not cycle.body_done or self.server.draining:
            self._close(linger=not cycle.body_done)
            return
        if self._paused:
            # Pauses that belonged to this exchange's upstream or body must not outlive it.
            self._resume(_PAUSE_UPSTREAM | _PAUSE_BUFFER)
        if self._queue:
            self._begin(self._queue.popleft())
            if not self._queue and self._pending_error is None:
                self._resume(_PAUSE_QUEUE)
            return
        if self._pending_error is not None:
            self._write_error_and_close(self._pending_error)
            return
        if self._eof:
            self._close()
            return
        if self._paused:
            self._resume(_PAUSE_QUEUE)
        # The next request's head may have started arriving while this one was served.
        self._idle = not self._in_head
        wait = self.settings.header_timeout if self._in_head else self.settings.idle_timeout
        deadline = self._deadline = self.loop.time() + wait
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    # the connection's timer and flow control

    def _arm(self, deadline: float) -> None:
        """Have the timer fire at ``deadline``, or sooner to look again.

        The timer fires at most ``server.min_span`` (the shortest timeout) from now, so a
        deadline set later, never nearer than that span, needs no new timer: callers
        only call this when no timer is set or the deadline is nearer than it.
        """
        if self._timer is not None:
            self._timer.cancel()
        loop = self.loop
        at = min(deadline, loop.time() + self.server.min_span)
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        cycle = self._current
        if cycle is not None and cycle.stage != _WAITING and cycle.stage != _STREAMING:
            # A handler or a connect is running: neither has a deadline here, unless the
            # handler waits for the request body.
            reading = cycle.reading
            if reading is not None and reading.waiter is not None:
                self._body_late(cycle, reading)
            return
        now = self.loop.time()
        if now < self._deadline:
            self._arm(self._deadline)
        elif cycle is None:
            if self._idle:
                self._close()
            else:
                # No lingering: a client this slow gets no more time (slowloris).
                self._write_error_and_close(
                    problem(
                        408,
                        "Request Timeout",
                        f"no complete request head within {self.settings.header_timeout}s",
                    ),
                    linger=False,
                )
        elif cycle.stage == _WAITING:
            self._upstream_late(cycle, now)
        else:
            self._upstream_stalled(cycle, now)

    def _upstream_late(self, cycle: _Cycle, now: float) -> None:
        exchange = cycle.exchange
        timeout = cycle.response_timeout
        if not cycle.body_done:
            late = self._body_late_by(cycle, now)
            if late is not None:
                self._respond(cycle, self._body_overdue(cycle, late))
                return
            body_timeout = self.settings.body_timeout
            if not self._paused & _PAUSE_UPSTREAM:
                # The body is flowing: look again when it would have been quiet too long.
                self._deadline = min(cycle.body_at + body_timeout, cycle.body_by)
                self._arm(self._deadline)
                return
            if exchange.bytes_in != cycle.bytes_seen:
                # The upstream takes the body, slowly: it is not late yet.
                cycle.bytes_seen = exchange.bytes_in
                self._deadline = min(now + min(timeout, body_timeout), cycle.body_by)
                self._arm(self._deadline)
                return
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        exchange.error = f"upstream sent no response within {timeout}s"
        if self._retry(cycle, 504, exchange.error):
            return
        cycle.keep_alive = cycle.keep_alive and cycle.body_done
        self._respond(cycle, problem(504, "Gateway Timeout", exchange.error))

    def _body_late_by(self, cycle: _Cycle, now: float) -> str | None:
        """Why the request body still being forwarded is too late, or None: past the
        deadline for the whole body, or quiet for ``body_timeout`` while the upstream
        was ready to take more."""
        settings = self.settings
        if now >= cycle.body_by:
            return f"the request body was not complete within {settings.body_total_timeout}s"
        if not self._paused & _PAUSE_UPSTREAM and now >= cycle.body_at + settings.body_timeout:
            return f"no request body bytes for {settings.body_timeout}s"
        return None

    def _body_overdue(self, cycle: _Cycle, reason: str) -> Response:
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        cycle.keep_alive = False
        cycle.exchange.error = reason
        return problem(408, "Request Timeout", reason)

    def _upstream_stalled(self, cycle: _Cycle, now: float) -> None:
        conn = cycle.upstream
        if conn is None:
            return
        exchange = cycle.exchange
        if not cycle.body_done:
            late = self._body_late_by(cycle, now)
            if late is not None:
                # The response has begun: the client can only see a broken connection.
                self._body_overdue(cycle, late)
                self._fail(cycle, problem(408, "Request Timeout", late))
                return
        timeout = cycle.response_timeout
        if conn.paused and self._write_paused:
            # The client does not read: its silence, not the upstream's, up to send_timeout.
            send_timeout = self.settings.send_timeout
            waited = now - self._write_paused_at
            if waited >= send_timeout:
                exchange.error = f"the client read nothing for {send_timeout}s"
                self._fail(cycle, problem(408, "Request Timeout", exchange.error))
                return
            self._deadline = now + min(timeout, send_timeout - waited)
            self._arm(self._deadline)
            return
        # While paused by back pressure the upstream's silence is the client's doing.
        idle = 0.0 if conn.paused else now - conn.last_activity
        if idle < timeout:
            deadline = now + timeout - idle
            if not cycle.body_done:
                deadline = min(deadline, cycle.body_at + self.settings.body_timeout, cycle.body_by)
            self._deadline = deadline
            self._arm(deadline)
            return
        conn.abort()
        cycle.upstream = None
        self.upstream_lost(UpstreamError(f"upstream body stalled for {timeout}s"))

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def _close(self, linger: bool = False) -> None:
        transport = self.transport
        if self._closed or transport is None:
            return
        self._closed = True
        self._cancel_timer()
        self.server.connections.discard(self)
        if transport.get_write_buffer_size():
            # What is buffered still goes out, but a client that reads nothing cannot hold
            # the close open for longer than the send timeout.
            self.loop.call_later(self.settings.send_timeout, transport.abort)
        if linger and transport.can_write_eof():
            # The client may still be sending what we did not read. Closing now would
            # make its kernel answer with a reset that can destroy our answer before it
            # is read: send FIN after the answer, drop what arrives for a moment, close.
            transport.write_eof()
            transport.resume_reading()
            self.loop.call_later(_LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def shutdown(self) -> None:
        """Stop after the current response; close now when idle."""
        if self._current is None:
            self._close()
