"""The objects a request passes through: headers, the request, a local response, the exchange.

The engine creates one :class:`Exchange` per request and hands it to the role's
:class:`Handler`. Nothing here knows about products, plans or services.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshgate.proxy._tls import TlsInfo

__all__ = [
    "ClientDisconnected",
    "Exchange",
    "Handler",
    "Headers",
    "Request",
    "RequestBodyError",
    "Response",
    "problem",
]


class Headers:
    """An ordered, case-insensitive multi-map of header fields.

    Names are stored lowercased as ``bytes``; values as received. The string
    accessors decode as latin-1, which is what HTTP/1.1 field values are.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes, bytes]] | None = None) -> None:
        self._items: list[tuple[bytes, bytes]] = list(items) if items is not None else []

    def raw(self) -> list[tuple[bytes, bytes]]:
        """The underlying list of ``(lowercase name, value)`` pairs; mutate with care."""
        return self._items

    def get(self, name: str, default: str | None = None) -> str | None:
        key = _key(name)
        for k, v in self._items:
            if k == key:
                return v.decode("latin-1")
        return default

    def get_raw(self, name: bytes) -> bytes | None:
        """The first value of ``name``, given as lowercase bytes (``b"origin"``), undecoded.

        The hot-path lookup: no encoding of the name, no decoding of the value.
        """
        for k, v in self._items:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        key = _key(name)
        return [v.decode("latin-1") for k, v in self._items if k == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _key(name)
        for k, _ in self._items:
            if k == key:
                return True
        return False

    def add(self, name: str, value: str) -> None:
        self._items.append((_key(name), value.encode("latin-1")))

    def set(self, name: str, value: str) -> None:
        """Replace every field of this name with one field of this value."""
        key = _key(name)
        field = (key, value.encode("latin-1"))
        items = self._items
        for i, (k, _) in enumerate(items):
            if k == key:
                # In place: the field keeps its position, later duplicates go.
                items[i] = field
                _remove_from(items, key, i + 1)
                return
        items.append(field)

    def remove(self, name: str) -> None:
        _remove_from(self._items, _key(name), 0)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for k, v in self._items:
            yield k.decode("latin-1"), v.decode("latin-1")

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


# Field names as stored, by the names callers use: the same few names come up on every
# request. Bounded, in case names ever come from requests.
_KEYS: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    key = _KEYS.get(name)
    if key is None:
        key = name.lower().encode("latin-1")
        if len(_KEYS) < 1024:
            _KEYS[name] = key
    return key


def _remove_from(items: list[tuple[bytes, bytes]], key: bytes, start: int) -> None:
    for i in range(len(items) - 1, start - 1, -1):
        if items[i][0] == key:
            del items[i]


def wrap_headers(items: list[tuple[bytes, bytes]]) -> Headers:
    """A :class:`Headers` over ``items`` itself, not a copy: the engine's parsed lists."""
    headers = _new_headers(Headers)
    headers._items = items
    return headers


_new_headers = object.__new__


class Request:
    """A parsed request head. ``path`` is normalized (dot segments resolved, see ``_path``)."""

    __slots__ = (
        "method",
        "raw_target",
        "path",
        "query",
        "headers",
        "http_version",
        "client_ip",
        "scheme",
        "host",
        "content_length",
        "chunked",
        "request_id",
        "tls",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        raw_target: bytes,
        path: str,
        query: str,
        headers: Headers,
        http_version: str = "1.1",
        client_ip: str = "",
        scheme: str = "http",
        host: str = "",
        content_length: int | None = None,
        chunked: bool = False,
        request_id: str = "",
        tls: TlsInfo | None = None,
        upgrade: str | None = None,
    ) -> None:
        self.method = method
        self.raw_target = raw_target
        self.path = path
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.client_ip = client_ip
        self.scheme = scheme
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.request_id = request_id
        # The connection's TLS (version, ALPN, SNI, the verified client certificate).
        self.tls = tls
        # The protocol an upgrade request asks for (``websocket``), else None: the
        # connection becomes a tunnel once the upstream answers 101.
        self.upgrade = upgrade

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class Response:
    """A response the gateway answers itself, without calling an upstream."""

    __slots__ = ("status", "headers", "body")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers | None = None,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else Headers()
        if content_type is not None:
            self.headers.set("content-type", content_type)


def problem(status: int, title: str, detail: str = "", **extra: Any) -> Response:
    """An ``application/problem+json`` response (RFC 9457)."""
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    doc.update(extra)
    return Response(status, json.dumps(doc).encode(), content_type="application/problem+json")


class RequestBodyError(Exception):
    """The request body could not be read whole; ``status`` is what the engine answers.

    413 (over the limit), 408 (the client went silent for ``body_timeout``) or 400
    (malformed, or cut short). The engine sends that answer itself, whatever the
    handler then returns, and closes the connection.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ClientDisconnected(RequestBodyError):
    """The client closed the connection (or its sending side) before the body was complete."""


class _BodySource(Protocol):
    """The connection an exchange reads its request body from (the engine's protocol)."""

    def request_body(self, exchange: Exchange, limit: int | None) -> bytes | Awaitable[bytes]: ...


class Exchange:
    """One request's journey through the engine, shared by the handler's phases.

    The handler sets ``upstream`` (an :class:`~meshgate.proxy.UpstreamPool`) and
    ``upstream_target`` (path and query sent upstream) to forward; the engine fills in
    ``status``, byte counts and timings as the exchange proceeds. ``state`` belongs to
    the role (product, application, usage...). A handler that must see the request body
    before it answers awaits :meth:`read_body`.

    For a handler with ``retry`` (see :class:`Handler`): ``timeout``, when set, replaces
    the pool's ``response_timeout`` for each attempt (the wait for the response head,
    and the silence allowed while its body streams); ``retry_statuses`` are the response
    statuses offered to ``retry`` before their head reaches the client; ``attempts``
    counts the attempts at forwarding, each counted as it starts (a connect that fails
    is one; the engine's own resend on a stale pooled connection is not). ``span`` is
    the role's trace span of the request, if it records one.
    """

    __slots__ = (
        "request",
        "route_path",
        "upstream",
        "upstream_target",
        "max_body_size",
        "status",
        "bytes_in",
        "bytes_out",
        "start",
        "upstream_start",
        "upstream_headers_at",
        "end",
        "error",
        "state",
        "response_headers",
        "timeout",
        "retry_statuses",
        "attempts",
        "span",
        "_body_source",
    )

    _body_source: _BodySource  # set by the engine on requests with a body, else unset

    def __init__(self, request: Request, start: float) -> None:
        self.request = request
        # The path relative to the matched route's prefix; rewrite policies change it.
        self.route_path: str = request.path
        self.upstream: Any = None
        self.upstream_target: str = ""
        self.max_body_size: int | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.start = start
        self.upstream_start = 0.0
        self.upstream_headers_at = 0.0
        self.end = 0.0
        self.error: str | None = None
        self.state: Any = None
        self.response_headers: Headers | None = None
        self.timeout: float | None = None
        self.retry_statuses: frozenset[int] | None = None
        self.attempts = 0
        # The role's trace span for this request, when it is sampled (telemetry.tracing).
        self.span: Any = None

    async def read_body(self, limit: int | None = None) -> bytes:
        """The whole request body, once it has arrived: for a handler that needs it to answer.

        Await it in ``handle`` (an ``async def``, or the awaitable it returns) before
        answering; later it raises ``RuntimeError``. ``Content-Length`` and chunked bodies
        alike; ``b""`` without a body. The bytes are held in memory, bounded by ``limit``
        and ``max_body_size`` (the smaller applies; neither means no bound): a declared
        length above it is refused before a byte is read, a chunked body as soon as its
        count passes it. ``Expect: 100-continue`` is answered when the read starts (a
        handler that answers without reading sends no 100). A second call returns the
        same bytes. Forwarding afterwards (returning ``None``) sends these bytes
        upstream, once, framed as the client framed them.

        Raises :class:`RequestBodyError` (413, 408, 400) or :class:`ClientDisconnected`;
        the engine then answers that status itself, whatever the handler returns, and
        closes the connection.
        """
        source: _BodySource | None = getattr(self, "_body_source", None)
        if source is None:
            if self.request.has_body:
                raise RuntimeError("this exchange is not served by the engine: no body to read")
            return b""
        body = source.request_body(self, limit)
        if isinstance(body, bytes):
            return body
        return await body


class Handler(Protocol):
    """What a role plugs into the engine.

    ``handle`` runs once the request head is parsed and before any body byte is
    forwarded. It returns a :class:`Response` to answer locally, or ``None`` to forward
    to ``exchange.upstream`` -- either directly, or as an awaitable of one of those
    (an ``async def handle`` is fine). Return directly whenever nothing has to wait: the
    engine then continues in the same callback, without a task; only an awaitable costs
    one task. An asynchronous ``handle`` may first await ``exchange.read_body()`` to
    answer from the request body. ``on_response`` may change the upstream's (or a local)
    response head before it is sent. ``on_complete`` runs exactly once per exchange that
    reached ``handle``, after the last byte was sent (or the exchange failed), and must not
    raise.

    Optionally, ``retry(exchange, status, error) -> bool`` (synchronous) is offered an
    attempt that failed before any response byte went to the client, when the request
    can be sent again whole (it has no body, or the handler read it with ``read_body``):
    connecting failed (``status`` 502, or 503 when the pool is at its connection limit;
    ``error`` says why), the upstream closed before the response head (502), the
    attempt's response timeout passed (504), or a response head arrived whose status is
    in ``exchange.retry_statuses`` (that status, ``error`` None; the response is
    discarded, ``on_response`` never sees it). Returning True sends the same request
    again to ``exchange.upstream``, which the handler may have changed (as it may
    ``timeout``); ``exchange.error`` is cleared for the new attempt. False (or an
    exception, logged) lets the failure go to the client as without ``retry``. The
    engine asks a handler's class once whether it has the method (:func:`retry_hook`):
    a handler without it pays nothing.
    """

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]: ...

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None: ...

    def on_complete(self, exchange: Exchange) -> None: ...


# A handler's optional ``retry`` method (see Handler).
RetryHook = Callable[[Exchange, int, str | None], bool]
# Whether a handler class has ``retry``: asked once a class, on the first failed attempt.
_RETRYING: dict[type, bool] = {}


def retry_hook(handler: Handler) -> RetryHook | None:
    """``handler.retry``, or None when the handler's class has no such method.

    Looked up by class, not by instance, so that a handler swapped out is not kept alive.
    """
    kind = type(handler)
    retrying = _RETRYING.get(kind)
    if retrying is None:
        retrying = _RETRYING[kind] = callable(getattr(kind, "retry", None))
    return handler.retry if retrying else None  # type: ignore[attr-defined]
