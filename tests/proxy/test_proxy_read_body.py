"""``Exchange.read_body``: a handler reads the whole request body before it answers.

A real engine on loopback, in a thread of this process, with a handler that reads the
body and answers its length and digest (or forwards it to the recording upstream).
Requests are raw bytes: what a client sends, what comes back on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import pytest
import uvloop
from proxy_helpers import RawClient, RecordingUpstream, chunked, get, wait_until

from meshgate.proxy import (
    ClientDisconnected,
    Exchange,
    Headers,
    Request,
    RequestBodyError,
    Response,
    Server,
    ServerSettings,
    UpstreamPool,
)

BODY_TIMEOUT = 0.5


@dataclass
class BodyHandler:
    """``/answer`` answers without reading; every other path reads the body, then answers
    ``{"length", "sha256"}`` or, on ``/forward``, forwards to the recording upstream.

    Query: ``limit`` (read_body's), ``max`` (max_body_size), ``delay`` (seconds before
    reading). ``outcomes`` maps the request's ``x-case`` to what read_body did.
    """

    pool: UpstreamPool
    outcomes: dict[str, str] = field(default_factory=dict)
    completed: list[tuple[str, int, str | None]] = field(default_factory=list)

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        if exchange.request.path == "/answer":
            return Response(200, b"answered without reading")
        if exchange.request.path == "/abandon":
            return self._abandon(exchange)
        return self._read(exchange)

    async def _abandon(self, exchange: Exchange) -> Response:
        """Starts a read, answers without waiting for it."""
        case = exchange.request.headers.get("x-case") or ""
        read = asyncio.ensure_future(exchange.read_body())

        def done(task: asyncio.Future[bytes]) -> None:
            self.outcomes[case] = "cancelled" if task.cancelled() else repr(task.exception())

        read.add_done_callback(done)
        await asyncio.sleep(0.05)
        return Response(200, b"abandoned")

    async def _read(self, exchange: Exchange) -> Response | None:
        request = exchange.request
        params = {k: v[0] for k, v in parse_qs(request.query).items()}
        case = request.headers.get("x-case") or ""
        if "max" in params:
            exchange.max_body_size = int(params["max"])
        if "delay" in params:
            await asyncio.sleep(float(params["delay"]))
        limit = int(params["limit"]) if "limit" in params else None
        try:
            body = await exchange.read_body(limit)
        except RequestBodyError as exc:
            self.outcomes[case] = f"{type(exc).__name__} {exc.status}"
            raise
        again = await exchange.read_body(limit)
        self.outcomes[case] = f"read {len(body)}" + ("" if again is body else " twice-different")
        if request.path == "/forward":
            exchange.upstream = self.pool
            exchange.upstream_target = "/forwarded/" + case
            return None
        doc = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        return Response(200, json.dumps(doc).encode(), content_type="application/json")

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        case = exchange.request.headers.get("x-case") or ""
        self.completed.append((case, exchange.status, exchange.error))


@dataclass
class Engine:
    port: int
    handler: BodyHandler
    recorder: RecordingUpstream
    loop: asyncio.AbstractEventLoop

    def tasks(self) -> int:
        """Tasks alive on the engine's loop, besides the one counting them."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def outcome(self, case: str, timeout: float = 5.0) -> str | None:
        wait_until(lambda: case in self.handler.outcomes, timeout)
        return self.handler.outcomes.get(case)

    def completions(self, case: str) -> list[tuple[str, int, str | None]]:
        return [c for c in list(self.handler.completed) if c[0] == case]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    recorder = RecordingUpstream()
    loop = uvloop.new_event_loop()
    pool = UpstreamPool("127.0.0.1", recorder.port, loop=loop)
    handler = BodyHandler(pool)
    settings = ServerSettings(header_timeout=2.0, idle_timeout=5.0, body_timeout=BODY_TIMEOUT)
    server = Server(handler, settings, loop=loop)
    port = _free_port()
    loop.run_until_complete(server.start("127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield Engine(port, handler, recorder, loop)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    recorder.close()


def post(path: str, case: str, body: bytes = b"", *extra: str, length: int | None = None) -> bytes:
    """A POST with a Content-Length body (``length`` overrides the declared length)."""
    declared = len(body) if length is None else length
    fields = [f"X-Case: {case}", f"Content-Length: {declared}", *extra]
    return get(path, *fields, method="POST") + body


def post_chunked(path: str, case: str, *extra: str) -> bytes:
    return get(path, f"X-Case: {case}", "Transfer-Encoding: chunked", *extra, method="POST")


def digest(body: bytes) -> dict[str, object]:
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_a_content_length_body_is_read_whole_and_the_connection_kept(engine):
    body = bytes(range(256)) * 1000
    with RawClient(engine.port) as client:
        reply = client.exchange(post("/read", "cl", body))
        assert reply.status == 200
        assert reply.json() == digest(body)
        assert reply.get("connection") is None
        again = client.exchange(post("/read", "cl-2", b"second"))
        assert again.json() == digest(b"second")
    assert engine.outcome("cl") == f"read {len(body)}"


def test_a_chunked_body_is_read_whole_and_trailers_are_dropped(engine):
    pieces = [b"a" * 10, b"b" * 70000, b"c"]
    with RawClient(engine.port) as client:
        client.send(post_chunked("/read", "chunked") + chunked(*pieces, trailers=b"X-T: 1\r\n"))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json() == digest(b"".join(pieces))
        assert client.exchange(get("/answer")).status == 200


def test_a_body_sent_slowly_in_pieces_is_read_whole(engine):
    body = b"x" * 3000
    with RawClient(engine.port) as client:
        client.send(post("/read", "pieces", b"", length=len(body)))
        for i in range(0, len(body), 1000):
            time.sleep(0.2)  # each pause below the body timeout
            client.send(body[i : i + 1000])
        reply = client.read_response()
        assert reply.json() == digest(body)


@pytest.mark.parametrize(
    "data",
    [
        get("/read", "X-Case: empty-get"),
        post("/read", "empty-cl0", b""),
        post_chunked("/read", "empty-chunked") + b"0\r\n\r\n",
    ],
    ids=["no-body", "content-length-0", "chunked-empty"],
)
def test_an_empty_body_reads_as_empty_bytes(engine, data):
    with RawClient(engine.port) as client:
        reply = client.exchange(data)
        assert reply.status == 200
        assert reply.json() == digest(b"")
        assert client.exchange(get("/answer")).status == 200  # still alive


def test_a_declared_length_over_the_limit_is_413_before_any_body_byte(engine):
    with RawClient(engine.port) as client:
        start = time.monotonic()
        client.send(post("/read?limit=1000", "over-header", b"", length=5000))
        reply = client.read_response()
        assert reply.status == 413
        assert time.monotonic() - start < BODY_TIMEOUT  # not waiting for the body
        assert reply.get("content-type") == "application/problem+json"
        assert "exceeds 1000 bytes" in reply.json()["detail"]
        assert reply.get("connection") == "close"
    assert engine.outcome("over-header") == "RequestBodyError 413"


def test_a_chunked_body_over_the_limit_is_413_as_soon_as_the_count_passes_it(engine):
    with RawClient(engine.port) as client:
        client.send(post_chunked("/read?limit=4096", "over-stream"))
        for _ in range(5):  # 5000 bytes; the terminating chunk never comes
            client.send(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
        reply = client.read_response()
        assert reply.status == 413
        assert "exceeds 4096 bytes" in reply.json()["detail"]
        assert reply.get("connection") == "close"
    assert engine.outcome("over-stream") == "RequestBodyError 413"


def test_max_body_size_bounds_a_read_without_a_limit(engine):
    with RawClient(engine.port) as client:
        reply = client.exchange(post("/read?max=8192", "max-size", b"m" * 9000))
        assert reply.status == 413
        assert "exceeds 8192 bytes" in reply.json()["detail"]
    with RawClient(engine.port) as client:
        reply = client.exchange(post("/read?max=8192&limit=100000", "max-ok", b"m" * 8192))
        assert reply.json() == digest(b"m" * 8192)


def test_a_client_that_stops_sending_its_body_gets_408(engine):
    with RawClient(engine.port) as client:
        start = time.monotonic()
        client.send(post("/read", "slow", b"only part", length=100))
        reply = client.read_response()
        elapsed = time.monotonic() - start
        assert reply.status == 408
        assert f"no request body bytes for {BODY_TIMEOUT}s" in reply.json()["detail"]
        assert BODY_TIMEOUT * 0.9 < elapsed < BODY_TIMEOUT + 1.0
        assert client.closed()
    assert engine.outcome("slow") == "RequestBodyError 408"


def test_a_client_that_disconnects_mid_body_ends_the_read_and_leaves_no_task(engine):
    with RawClient(engine.port) as client:
        client.send(post("/read", "gone", b"partial", length=1000))
        assert wait_until(lambda: engine.tasks() == 1)  # the handler, waiting for the body
    assert engine.outcome("gone") == "ClientDisconnected 400"
    assert wait_until(lambda: len(engine.completions("gone")) == 1)
    _, _, error = engine.completions("gone")[0]
    assert error is not None and "closed the connection" in error
    assert wait_until(lambda: engine.tasks() == 0)
    time.sleep(0.1)
    assert len(engine.completions("gone")) == 1


def test_a_client_that_half_closes_mid_body_gets_400(engine):
    with RawClient(engine.port) as client:
        client.send(post("/read", "half", b"partial", length=1000))
        client.sock.shutdown(socket.SHUT_WR)
        reply = client.read_response()
        assert reply.status == 400
        assert "before the request body was complete" in reply.json()["detail"]
        assert client.closed()
    assert engine.outcome("half") == "ClientDisconnected 400"


def test_expect_100_continue_is_answered_when_the_handler_reads(engine):
    body = b"after the interim answer"
    with RawClient(engine.port) as client:
        client.send(post("/read", "continue", b"", "Expect: 100-continue", length=len(body)))
        interim = client.read_response(interim=True)
        assert interim.status == 100
        client.send(body)
        reply = client.read_response()
        assert reply.json() == digest(body)
        assert client.exchange(get("/answer")).status == 200


def test_expect_100_continue_is_not_answered_when_the_handler_answers_without_reading(engine):
    with RawClient(engine.port) as client:
        client.send(post("/answer", "no-continue", b"", "Expect: 100-continue", length=10))
        reply = client.read_response(interim=True)
        assert reply.status == 200  # the final answer, no 100 before it
        assert reply.body == b"answered without reading"
        assert reply.get("connection") == "close"  # the body was never read


def test_expect_100_continue_over_the_limit_gets_413_without_a_100(engine):
    with RawClient(engine.port) as client:
        data = post("/read?limit=10", "continue-413", b"", "Expect: 100-continue", length=11)
        client.send(data)
        reply = client.read_response(interim=True)
        assert reply.status == 413


def test_pipelined_requests_after_a_read_body_are_parsed_and_answered_in_order(engine):
    first, second = b'{"n": 1}', b"y" * 70000
    data = (
        post("/read", "pipe-1", first)
        + post_chunked("/read", "pipe-2")
        + chunked(second[:5], second[5:])
        + get("/answer")
        + post("/read", "pipe-3", b"")
    )
    with RawClient(engine.port) as client:
        client.send(data)
        assert client.read_response().json() == digest(first)
        assert client.read_response().json() == digest(second)
        assert client.read_response().body == b"answered without reading"
        assert client.read_response().json() == digest(b"")
        assert client.exchange(post("/read", "pipe-4", b"z")).json() == digest(b"z")


def test_a_body_buffered_while_the_handler_waits_is_read_whole(engine):
    body = bytes(range(256)) * 8192  # 2 MiB: reading pauses above 256 KiB until the read
    with RawClient(engine.port) as client:
        client.send(post("/read?delay=0.3", "buffered", body))
        reply = client.read_response()
        assert reply.json() == digest(body)


def test_concurrent_connections_each_get_their_own_body(engine):
    results: dict[int, object] = {}

    def one(i: int) -> None:
        body = bytes([i]) * (1000 * (i + 1))
        with RawClient(engine.port) as client:
            client.send(post("/read", f"concurrent-{i}", b"", length=len(body)) + body[:500])
            time.sleep(0.05)  # every handler now waits for the rest of its body
            client.send(body[500:])
            results[i] = client.read_response().json() == digest(body)
            client.send(post_chunked("/read", f"concurrent-c{i}") + chunked(body[:1000], body))
            results[i + 100] = client.read_response().json() == digest(body[:1000] + body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert results == {key: True for key in [*range(24), *range(100, 124)]}


def test_forwarding_after_a_read_sends_the_bytes_read_once(engine):
    body = b'{"order": 42}'
    with RawClient(engine.port) as client:
        reply = client.exchange(post("/forward", "fwd-cl", body))
        assert reply.status == 200
        assert reply.json()["length"] == len(body)
        client.send(post_chunked("/forward", "fwd-chunked") + chunked(b"ab", b"cd" * 5000))
        reply = client.read_response()
        assert reply.json()["length"] == 10002
    (cl,) = engine.recorder.requests_for("/forwarded/fwd-cl")
    assert cl.body == body and cl.complete
    assert cl.header("content-length") == str(len(body))
    (ch,) = engine.recorder.requests_for("/forwarded/fwd-chunked")
    assert ch.body == b"ab" + b"cd" * 5000
    assert ch.header("transfer-encoding") == "chunked"
    assert engine.outcome("fwd-cl") == f"read {len(body)}"


def test_a_read_the_handler_does_not_wait_for_is_cancelled_when_it_answers(engine):
    with RawClient(engine.port) as client:
        client.send(post("/abandon", "abandon", b"part", length=100))
        reply = client.read_response()
        assert (reply.status, reply.body) == (200, b"abandoned")
        assert reply.get("connection") == "close"  # the body was not read
    assert engine.outcome("abandon") == "cancelled"
    assert wait_until(lambda: engine.tasks() == 0)


def test_a_malformed_chunk_during_a_read_is_400(engine):
    with RawClient(engine.port) as client:
        client.send(post_chunked("/read", "bad-chunk") + b"5\r\nabcde\r\n")
        assert wait_until(lambda: engine.tasks() == 1)  # the handler is reading
        client.send(b"zz\r\n")
        reply = client.read_response()
        assert reply.status == 400
        assert reply.get("connection") == "close"
    assert engine.outcome("bad-chunk") == "RequestBodyError 400"


def test_read_body_outside_the_engine():
    async def main() -> None:
        empty = Exchange(Request("GET", b"/", "/", "", Headers()), 0.0)
        assert await empty.read_body() == b""
        with_body = Exchange(Request("POST", b"/", "/", "", Headers(), content_length=3), 0.0)
        with pytest.raises(RuntimeError, match="not served by the engine"):
            await with_body.read_body()

    asyncio.run(main())


def test_the_exceptions_say_what_the_engine_answers():
    error = ClientDisconnected(400, "gone")
    assert isinstance(error, RequestBodyError)
    assert (error.status, str(error)) == (400, "gone")
