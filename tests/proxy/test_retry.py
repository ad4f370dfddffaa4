"""A role retries a failed upstream attempt (``Handler.retry``), each attempt bounded by
``Exchange.timeout``: over HTTP/1.1 and HTTP/2 clients, to HTTP/1.1 and HTTP/2 upstreams.

A real engine on loopback, in a thread of this process, in front of two recording
upstreams (``a`` and ``b``, which answer differently), a port nothing listens on
(``dead``) and two h2c origins (``h2bad`` answers 503, ``h2good`` echoes). Each request
names its route in ``x-route``: the first pool, then the pool each retry goes to.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from h2_support import EngineThread, H2Client
from proxy_helpers import (
    Incomplete,
    RawClient,
    Received,
    RecordingUpstream,
    chunked,
    get,
    wait_until,
)

from meshgate.proxy import (
    Exchange,
    H2UpstreamPool,
    Headers,
    Response,
    Server,
    ServerSettings,
    UpstreamPool,
)

POOL_TIMEOUT = 5.0  # the pools' own response timeout: far above any attempt's
STALL = 1.5  # how long a stalling upstream waits before it answers


class RecordingHandler:
    """Forwards as ``x-route`` says and records every phase per ``x-case``; no ``retry``.

    Request fields: ``x-route`` (pool names, first one first), ``x-retry-on`` (statuses),
    ``x-timeout`` (the attempt timeout), ``x-read`` (read the body before forwarding).
    """

    def __init__(self, pools: dict[str, Any]) -> None:
        self.pools = pools
        self.retries: dict[str, list[tuple[int, str | None, int]]] = defaultdict(list)
        self.responses: dict[str, list[int]] = defaultdict(list)
        self.completed: dict[str, list[tuple[int, str | None, int, int]]] = defaultdict(list)

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        fields = exchange.request.headers
        route = (fields.get("x-route") or "").split(",")
        exchange.state = (fields.get("x-case") or "", route[1:])
        exchange.upstream = self.pools[route[0]]
        query = exchange.request.query
        exchange.upstream_target = exchange.request.path + (f"?{query}" if query else "")
        statuses = fields.get("x-retry-on")
        if statuses:
            exchange.retry_statuses = frozenset(int(s) for s in statuses.split(","))
        timeout = fields.get("x-timeout")
        if timeout:
            exchange.timeout = float(timeout)
        if fields.get("x-read"):
            return self._read_first(exchange)
        return None

    async def _read_first(self, exchange: Exchange) -> None:
        await exchange.read_body()

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        self.responses[exchange.state[0]].append(status)

    def on_complete(self, exchange: Exchange) -> None:
        case = exchange.state[0] if exchange.state else ""
        self.completed[case].append(
            (exchange.status, exchange.error, exchange.attempts, exchange.bytes_in)
        )


class RetryHandler(RecordingHandler):
    """Retries on the next pool of the route while there is one; ``raise`` raises."""

    def retry(self, exchange: Exchange, status: int, error: str | None) -> bool:
        case, rest = exchange.state
        self.retries[case].append((status, error, exchange.attempts))
        if not rest:
            return False
        name = rest.pop(0)
        if name == "raise":
            raise RuntimeError("retry bug")
        exchange.upstream = self.pools[name]
        return True


class Origin:
    """An h2c origin: answers ``status``, naming itself, the path and the body length."""

    def __init__(self, name: str, status: int) -> None:
        self.name = name
        self.status = status

    async def handle(self, exchange: Exchange) -> Response:
        body = await exchange.read_body()
        doc = {"origin": self.name, "path": exchange.request.path, "length": len(body)}
        return Response(self.status, json.dumps(doc).encode(), content_type="application/json")

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


@dataclass
class Engine:
    thread: EngineThread
    server: Server
    handler: RetryHandler
    pools: dict[str, Any]
    a: RecordingUpstream
    b: RecordingUpstream
    h2bad: Origin
    h2good: Origin

    @property
    def port(self) -> int:
        return self.server.port

    def completed(self, case: str) -> list[tuple[int, str | None, int, int]]:
        wait_until(lambda: bool(self.handler.completed.get(case)))
        time.sleep(0.05)  # a second completion would show up by now
        return self.handler.completed[case]

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return self.thread.run(count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(status: int, text: bytes) -> bytes:
    return b"HTTP/1.1 %d Status\r\ncontent-length: %d\r\n\r\n%s" % (status, len(text), text)


def _unavailable(req: Received) -> tuple[bytes, bool]:
    return _answer(503, b"a is unavailable"), False


def _stalling(req: Received) -> tuple[Iterable[bytes], bool]:
    def late() -> Iterator[bytes]:
        time.sleep(STALL)
        yield _answer(200, b"a answered late")

    return late(), False


def _slow_body(req: Received) -> tuple[Iterable[bytes], bool]:
    def pieces() -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst"
        time.sleep(STALL)
        yield b"-rest"

    return pieces(), False


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    thread = EngineThread()
    a, b = RecordingUpstream(), RecordingUpstream()
    for path in ("/unavailable", "/post-unavailable"):
        a.scripts[path] = _unavailable
    a.scripts["/stall"] = _stalling
    a.scripts["/slow-body"] = _slow_body
    h2bad, h2good = Origin("h2bad", 503), Origin("h2good", 200)

    async def start() -> tuple[Server, list[Server], RetryHandler, dict[str, Any]]:
        loop = thread.loop
        origins = [Server(h2bad, loop=loop), Server(h2good, loop=loop)]
        for origin in origins:
            await origin.start("127.0.0.1", 0)

        def pool(port: int) -> UpstreamPool:
            return UpstreamPool("127.0.0.1", port, loop=loop, response_timeout=POOL_TIMEOUT)

        pools: dict[str, Any] = {
            "a": pool(a.port),
            "b": pool(b.port),
            "dead": pool(_free_port()),
            "busy": UpstreamPool("127.0.0.1", a.port, loop=loop, max_connections=0),
            "h2bad": H2UpstreamPool("127.0.0.1", origins[0].port, loop=loop),
            "h2good": H2UpstreamPool("127.0.0.1", origins[1].port, loop=loop),
        }
        handler = RetryHandler(pools)
        settings = ServerSettings(header_timeout=2.0, idle_timeout=5.0, body_timeout=2.0)
        server = Server(handler, settings, loop=loop)
        await server.start("127.0.0.1", 0)
        return server, origins, handler, pools

    server, origins, handler, pools = thread.run(start())
    try:
        yield Engine(thread, server, handler, pools, a, b, h2bad, h2good)
    finally:
        thread.run(server.shutdown(1.0))
        for origin in origins:
            thread.run(origin.shutdown(1.0))
        thread.stop()
        a.close()
        b.close()


# A client of either protocol: (status, body) of one request.

CLIENTS = ["h1", "h2"]


def fetch(
    engine: Engine,
    client: str,
    path: str,
    case: str,
    route: str,
    *fields: tuple[str, str],
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, bytes]:
    headers = [("x-case", case), ("x-route", route), *fields]
    if client == "h1":
        lines = [f"{k}: {v}" for k, v in headers]
        if body is not None and not any(k == "transfer-encoding" for k, _ in headers):
            lines.append(f"content-length: {len(body)}")
        with RawClient(engine.port) as raw:
            reply = raw.exchange(get(path, *lines, method=method) + (body or b""))
            return reply.status, reply.body
    with H2Client(engine.port) as h2:
        response = h2.response(h2.request(path, method=method, headers=headers, body=body))
        return response.status, bytes(response.body)


def _digest(body: bytes) -> tuple[int, str]:
    return len(body), hashlib.sha256(body).hexdigest()


def _origin_of(body: bytes) -> str:
    """Which upstream answered: the recording upstreams echo the target, the origins name
    themselves."""
    doc = json.loads(body)
    return str(doc.get("origin") or doc["target"])


# Connecting fails


@pytest.mark.parametrize("client", CLIENTS)
def test_a_refused_connection_is_retried_on_the_next_pool(engine, client):
    case = f"refused-{client}"
    status, body = fetch(engine, client, f"/{case}", case, "dead,b")
    assert status == 200
    assert json.loads(body)["target"] == f"/{case}"  # b answered
    assert len(engine.b.requests_for(case)) == 1
    ((retried_status, error, attempts),) = engine.handler.retries[case]
    assert retried_status == 502
    assert error is not None and "cannot connect" in error
    assert attempts == 1
    assert engine.handler.responses[case] == [200]
    assert engine.completed(case) == [(200, None, 2, 0)]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_pool_at_its_connection_limit_is_offered_as_503(engine, client):
    case = f"busy-{client}"
    status, body = fetch(engine, client, f"/{case}", case, "busy,b")
    assert status == 200
    assert json.loads(body)["target"] == f"/{case}"
    ((retried_status, error, attempts),) = engine.handler.retries[case]
    assert (retried_status, attempts) == (503, 1)
    assert error is not None and "limit" in error
    assert engine.a.requests_for(case) == []


@pytest.mark.parametrize("client", CLIENTS)
def test_every_failed_attempt_is_offered_until_the_handler_gives_up(engine, client):
    case = f"gives-up-{client}"
    status, body = fetch(engine, client, "/unavailable", case, "dead,dead,a")
    # The last attempt's 503 is not in retry_statuses (none are): it reaches the client.
    assert (status, body) == (503, b"a is unavailable")
    assert [(s, n) for s, _, n in engine.handler.retries[case]] == [(502, 1), (502, 2)]
    assert engine.completed(case) == [(503, None, 3, 0)]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_retry_that_says_no_or_raises_answers_as_before(engine, client):
    status, body = fetch(engine, client, "/no", f"no-{client}", "dead")
    assert status == 502
    assert b"cannot connect" in body
    assert [n for _, _, n in engine.handler.retries[f"no-{client}"]] == [1]
    case = f"raises-{client}"
    status, body = fetch(engine, client, "/raises", case, "dead,raise")
    assert status == 502
    assert b"cannot connect" in body
    assert len(engine.handler.retries[case]) == 1
    ((status, error, attempts, _),) = engine.completed(case)
    assert (status, attempts) == (502, 1)
    assert error is not None and "cannot connect" in error


# A response status the role retries on


@pytest.mark.parametrize("client", CLIENTS)
def test_a_status_in_retry_statuses_is_discarded_and_retried(engine, client):
    case = f"status-{client}"
    before = len(engine.b.requests_for("/unavailable"))
    status, body = fetch(engine, client, "/unavailable", case, "a,b", ("x-retry-on", "500,503"))
    assert status == 200, body
    assert json.loads(body)["target"] == "/unavailable"  # b's echo, not a's 503
    assert len(engine.b.requests_for("/unavailable")) == before + 1
    assert engine.handler.retries[case] == [(503, None, 1)]
    assert engine.handler.responses[case] == [200]  # on_response never saw the 503
    assert engine.completed(case) == [(200, None, 2, 0)]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_status_not_in_retry_statuses_is_forwarded(engine, client):
    case = f"other-status-{client}"
    before = len(engine.b.requests_for("/unavailable"))
    status, body = fetch(engine, client, "/unavailable", case, "a,b", ("x-retry-on", "502,504"))
    assert (status, body) == (503, b"a is unavailable")
    assert case not in engine.handler.retries
    assert len(engine.b.requests_for("/unavailable")) == before
    assert engine.handler.responses[case] == [503]
    assert engine.completed(case) == [(503, None, 1, 0)]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(("route", "answered_by"), [("h2bad,b", "/h2"), ("a,h2good", "h2good")])
def test_status_retries_between_http1_and_http2_upstreams(engine, client, route, answered_by):
    case = f"mixed-{client}-{route}"
    path = "/unavailable" if route.startswith("a") else "/h2"
    status, body = fetch(engine, client, path, case, route, ("x-retry-on", "503"))
    assert status == 200, body
    assert _origin_of(body) == answered_by
    assert engine.handler.retries[case] == [(503, None, 1)]
    assert engine.handler.responses[case] == [200]
    assert engine.completed(case) == [(200, None, 2, 0)]


# The attempt's own timeout


@pytest.mark.parametrize("client", CLIENTS)
def test_an_attempt_that_times_out_is_retried(engine, client):
    case = f"timeout-retry-{client}"
    start = time.monotonic()
    status, body = fetch(engine, client, "/stall", case, "a,b", ("x-timeout", "0.2"))
    elapsed = time.monotonic() - start
    assert status == 200
    assert json.loads(body)["target"] == "/stall"  # b's echo, not a's late answer
    assert elapsed < STALL, elapsed
    ((retried_status, error, attempts),) = engine.handler.retries[case]
    assert (retried_status, attempts) == (504, 1)
    assert error == "upstream sent no response within 0.2s"
    assert engine.completed(case) == [(200, None, 2, 0)]


@pytest.mark.parametrize("client", CLIENTS)
def test_the_attempt_timeout_replaces_the_pools_when_not_retried(engine, client):
    case = f"timeout-{client}"
    start = time.monotonic()
    status, body = fetch(engine, client, "/stall", case, "a", ("x-timeout", "0.2"))
    elapsed = time.monotonic() - start
    assert status == 504
    assert b"within 0.2s" in body
    assert 0.15 < elapsed < 0.9, elapsed  # not the pool's 5 s, nor a's 1.5 s stall
    assert [s for s, _, _ in engine.handler.retries[case]] == [504]
    assert engine.completed(case)[0][0] == 504


@pytest.mark.parametrize("client", CLIENTS)
def test_the_attempt_timeout_bounds_a_response_body_that_stalls(engine, client):
    case = f"body-stall-{client}"
    fields = [("x-case", case), ("x-route", "a,b"), ("x-timeout", "0.2")]
    start = time.monotonic()
    if client == "h1":
        with RawClient(engine.port) as raw, pytest.raises(Incomplete, match="after 5 of 10"):
            raw.exchange(get("/slow-body", *(f"{k}: {v}" for k, v in fields)))
    else:
        with H2Client(engine.port) as h2:
            response = h2.response(h2.request("/slow-body", headers=fields))
            assert (response.status, bytes(response.body)) == (200, b"first")
            assert response.reset is not None
    assert time.monotonic() - start < 1.0
    # The head went to the client: nothing to retry.
    assert case not in engine.handler.retries
    ((status, error, attempts, _),) = engine.completed(case)
    assert (status, error, attempts) == (200, "upstream body stalled for 0.2s", 1)


# Request bodies


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_read_by_the_handler_is_replayed_byte_for_byte(engine, client, framing):
    case = f"replay-{client}-{framing}"
    payload = bytes(range(256)) * 300 + case.encode()
    target = f"/post?{case}"
    engine.a.scripts[target] = _unavailable
    fields = [("x-read", "1"), ("x-retry-on", "503")]
    sent = payload
    if framing == "length" and client == "h2":
        fields.append(("content-length", str(len(payload))))
    elif framing == "chunked" and client == "h1":
        fields.append(("transfer-encoding", "chunked"))
        sent = chunked(payload[:1000], payload[1000:])
    status, body = fetch(
        engine, client, target, case, "dead,a,b", *fields, method="POST", body=sent
    )
    assert status == 200, body
    doc = json.loads(body)
    assert doc["target"] == target  # b answered
    assert (doc["length"], doc["sha256"]) == _digest(payload)
    (to_a,) = engine.a.requests_for(case)
    (to_b,) = engine.b.requests_for(case)
    assert _digest(to_a.body) == _digest(payload)
    assert _digest(to_b.body) == _digest(payload)
    assert [s for s, _, _ in engine.handler.retries[case]] == [502, 503]
    # Counted once, as the client sent it, whatever the attempts.
    assert engine.completed(case) == [(200, None, 3, len(payload))]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_streamed_body_is_not_offered_for_retry(engine, client):
    payload = b"s" * 50_000
    refused = f"streamed-refused-{client}"
    status, _ = fetch(engine, client, "/post", refused, "dead,b", method="POST", body=payload)
    assert status == 502
    answered = f"streamed-503-{client}"
    target = "/post-unavailable"
    status, body = fetch(
        engine, client, target, answered, "a,b", ("x-retry-on", "503"), method="POST", body=payload
    )
    assert (status, body) == (503, b"a is unavailable")
    assert refused not in engine.handler.retries
    assert answered not in engine.handler.retries
    assert engine.handler.responses[answered] == [503]
    assert engine.completed(answered) == [(503, None, 1, len(payload))]


# Without retry, and when the client leaves


@pytest.mark.parametrize("client", CLIENTS)
def test_a_handler_without_retry_answers_as_before(engine, client):
    plain = RecordingHandler(engine.pools)
    assert not hasattr(plain, "retry")
    engine.server.handler = plain
    try:
        status, body = fetch(
            engine, client, "/unavailable", "plain-status", "a,b", ("x-retry-on", "503")
        )
        assert (status, body) == (503, b"a is unavailable")
        status, _ = fetch(engine, client, "/refused", "plain-refused", "dead,b")
        assert status == 502
    finally:
        engine.server.handler = engine.handler
    assert plain.responses["plain-status"] == [503]
    assert plain.completed["plain-refused"][0][:1] == (502,)
    # The swap back brings retries back.
    status, _ = fetch(engine, client, "/refused", f"swapped-back-{client}", "dead,b")
    assert status == 200


@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_leaving_during_a_retry_leaves_nothing_behind(engine, client):
    case = f"leaves-{client}"
    target = f"/{case}"
    engine.a.scripts[target] = _unavailable
    engine.b.scripts[target] = _stalling
    names = (f"a-{case}", f"b-{case}")

    def fresh() -> None:
        loop = engine.thread.loop
        engine.pools[names[0]] = UpstreamPool("127.0.0.1", engine.a.port, loop=loop)
        engine.pools[names[1]] = UpstreamPool("127.0.0.1", engine.b.port, loop=loop)

    engine.thread.call(fresh)
    first, second = engine.pools[names[0]], engine.pools[names[1]]

    def open_counts() -> tuple[int, int]:
        return engine.thread.call(lambda: (first.open, second.open))

    tasks = engine.tasks()
    fields = [("x-case", case), ("x-route", ",".join(names)), ("x-retry-on", "503")]
    if client == "h1":
        raw = RawClient(engine.port)
        raw.send(get(target, *(f"{k}: {v}" for k, v in fields)))
        sock = raw.sock
    else:
        h2 = H2Client(engine.port)
        h2.request(target, headers=fields)
        sock = h2.sock

    def leave() -> None:
        # A reset, not a half close (after which HTTP/1.1 would still send the answer).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    try:
        # a answered 503, the retry went to b, which stalls: the client leaves now.
        engine.b.wait_for(target)
        assert engine.handler.retries[case] == [(503, None, 1)]
        assert wait_until(lambda: open_counts() == (0, 1)), open_counts()
    finally:
        leave()
    assert wait_until(lambda: open_counts() == (0, 0)), open_counts()
    assert wait_until(lambda: engine.tasks() <= tasks), (engine.tasks(), tasks)
    ((status, error, attempts, _),) = engine.completed(case)
    assert (status, attempts) == (0, 2)
    assert error == "client closed the connection"
