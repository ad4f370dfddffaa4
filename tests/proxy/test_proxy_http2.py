"""HTTP/2 on the engine alone: h2c and h2 over TLS, the handler contract per stream,
forwarding to HTTP/1.1 and HTTP/2 upstreams, flow control both ways, and gRPC refusals.

A real server on loopback, in a thread of this process, in front of the recording
upstream (HTTP/1.1) and of a second engine server acting as an h2c origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from h2_support import (
    SETTINGS,
    Engine,
    EngineThread,
    H2Client,
    StreamHandler,
    localhost_certificate,
    running_engine,
)
from proxy_helpers import RawClient, Received, get, wait_until

from meshgate.proxy import (
    CertificateFiles,
    H2UpstreamPool,
    Server,
    ServerSettings,
    ServerTls,
    UpstreamPool,
    client_context,
)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with running_engine() as engine:
        yield engine


def _wait_completed(engine: Engine, path: str, count: int = 1) -> list[tuple[str, int, str | None]]:
    wait_until(lambda: len(engine.handler.completions(path)) >= count)
    return engine.handler.completions(path)


# h2c and h2, local and forwarded


def test_h2c_prior_knowledge_local_and_forwarded(engine):
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        local = client.get(engine.url("/local/a"))
        assert local.http_version == "HTTP/2"
        assert (local.status_code, local.text) == (200, "local /local/a")
        assert local.headers["content-length"] == str(len("local /local/a"))
        assert local.headers["x-phase"] == "response"
        assert len(local.headers["x-request-id"]) == 32
        assert "date" in local.headers
        forwarded = client.get(engine.url("/up/b?x=1"))
        assert forwarded.status_code == 200
        assert forwarded.json()["target"] == "/up/b?x=1"
        assert forwarded.headers["x-phase"] == "response"
    assert _wait_completed(engine, "/local/a") == [("/local/a", 200, None)]
    assert _wait_completed(engine, "/up/b") == [("/up/b", 200, None)]


def test_the_handler_sees_the_request_as_over_http1(engine):
    with H2Client(engine.port) as client:
        stream = client.request(
            "/info/a/../b?q=1",
            headers=[("X-Thing", "1"), ("content-length", "3")],
            body=b"abc",
            authority="api.example:8443",
        )
        response = client.response(stream)
    assert response.status == 200
    info = json.loads(response.body)
    assert info["method"] == "GET"
    assert (info["path"], info["query"]) == ("/info/b", "q=1")
    assert (info["host"], info["scheme"], info["http_version"]) == ("api.example:8443", "http", "2")
    assert info["headers"] == [["x-thing", "1"], ["content-length", "3"]]
    assert (info["content_length"], info["has_body"]) == (3, True)


def test_forwarded_to_http1_with_the_proxy_fields_and_both_body_framings(engine):
    with H2Client(engine.port) as client:
        sized = client.request(
            "/up/sized",
            method="POST",
            headers=[("content-length", "5"), ("cookie", "a=1"), ("cookie", "b=2")],
            body=b"hello",
        )
        unsized = client.request("/up/unsized", method="POST", body=b"x" * 100_000)
        assert client.response(sized).status == 200
        assert client.response(unsized).status == 200
    (first,) = engine.recorder.requests_for("/up/sized")
    assert first.body == b"hello" and first.header("content-length") == "5"
    assert first.header("cookie") == "a=1; b=2"
    assert first.header("host") == f"127.0.0.1:{engine.recorder.port}"
    assert first.header("x-forwarded-for") == "127.0.0.1"
    assert first.header("x-forwarded-proto") == "http"
    assert first.header("x-forwarded-host") == "gw.test"
    assert len(first.header("x-request-id") or "") == 32
    assert not [name for name in first.header_names() if name.startswith(":")]
    (second,) = engine.recorder.requests_for("/up/unsized")
    assert second.header("transfer-encoding") == "chunked"
    assert second.body == b"x" * 100_000


def test_h2_over_tls_by_alpn(tmp_path: Path):
    ca, cert, key = localhost_certificate(tmp_path)
    thread = EngineThread()
    handler = StreamHandler({})
    tls = ServerTls([CertificateFiles(cert, key)])
    server = Server(handler, ServerSettings(), loop=thread.loop, tls=tls)
    thread.run(server.start("127.0.0.1", 0))
    try:
        context = ssl.create_default_context(cafile=ca)
        with httpx.Client(http2=True, verify=context, timeout=10) as client:
            response = client.get(f"https://localhost:{server.port}/info/tls")
        assert response.http_version == "HTTP/2"
        info = response.json()
        assert (info["scheme"], info["alpn"], info["http_version"]) == ("https", "h2", "2")
        # A client that offers only HTTP/1.1 is served HTTP/1.1 on the same listener.
        with httpx.Client(http2=False, verify=context, timeout=10) as client:
            response = client.get(f"https://localhost:{server.port}/info/tls")
        assert response.http_version == "HTTP/1.1"
        assert response.json()["http_version"] == "1.1"
    finally:
        thread.run(server.shutdown(1.0))
        thread.stop()


def test_http2_can_be_turned_off():
    thread = EngineThread()
    server = Server(StreamHandler({}), ServerSettings(http2=False), loop=thread.loop)
    thread.run(server.start("127.0.0.1", 0))
    try:
        assert server.h2 is None
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            answer = sock.recv(65536)
        # Read as HTTP/1.1, where it is malformed.
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"malformed HTTP/1.1" in answer
    finally:
        thread.run(server.shutdown(1.0))
        thread.stop()


def test_many_concurrent_streams_share_one_connection(engine):
    def slow(req: Received) -> tuple[Any, bool]:
        time.sleep(0.5)
        body = req.target.encode()
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body), False

    paths = [f"/up/concurrent-{i}" for i in range(8)]
    for path in paths:
        engine.recorder.scripts[path] = slow
    before = len(engine.recorder.received)

    async def fetch_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
            return await asyncio.gather(*(client.get(engine.url(p)) for p in paths))

    started = time.monotonic()
    responses = asyncio.run(fetch_all())
    elapsed = time.monotonic() - started
    assert [r.text for r in responses] == paths
    assert all(r.http_version == "HTTP/2" for r in responses)
    assert len(engine.recorder.received) - before == len(paths)
    assert elapsed < 2.5, f"streams were served one after another ({elapsed:.1f}s)"


def test_streams_beyond_the_limit_are_refused_and_the_others_served(engine):
    with H2Client(engine.port) as client:
        # Opened before the client read the server's SETTINGS, as a client may.
        streams = [client.request("/slow/0.4") for _ in range(SETTINGS["max_concurrent_streams"])]
        extra = [client.request("/slow/0.4") for _ in range(3)]
        for stream in extra:
            assert client.response(stream).reset.name == "REFUSED_STREAM"
        for stream in streams:
            response = client.response(stream)
            assert (response.status, bytes(response.body)) == (200, b"slow")
        # Room again: a new stream is served on the same connection.
        assert client.response(client.request("/local/after")).status == 200
        assert client.goaway is None


# the handler contract, per stream


def test_read_body_and_async_answers(engine):
    body = bytes(range(256)) * 4000
    with H2Client(engine.port) as client:
        stream = client.request("/read/all", method="POST", body=body)
        response = client.response(stream)
    assert json.loads(response.body) == {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert _wait_completed(engine, "/read/all") == [("/read/all", 200, None)]


def test_handler_failure_is_500_and_the_connection_goes_on(engine):
    with H2Client(engine.port) as client:
        failed = client.response(client.request("/raise/x"))
        assert failed.status == 500
        assert failed.get("content-type") == "application/problem+json"
        assert client.response(client.request("/local/after-raise")).status == 200
    assert _wait_completed(engine, "/raise/x") == [("/raise/x", 500, None)]


def test_body_over_max_body_size_is_413(engine):
    with H2Client(engine.port) as client:
        stream = client.request("/small/too-big", method="POST", body=b"x" * 5000)
        response = client.response(stream)
        assert response.status == 413
        assert client.response(client.request("/local/after-413")).status == 200
    assert not engine.recorder.requests_for("/small/too-big") or not any(
        r.complete for r in engine.recorder.requests_for("/small/too-big")
    )
    ((_, status, _),) = _wait_completed(engine, "/small/too-big")
    assert status == 413


def test_upstream_unreachable_is_502_and_completes_once(engine):
    with H2Client(engine.port) as client:
        assert client.response(client.request("/dead/x")).status == 502
    ((_, status, error),) = _wait_completed(engine, "/dead/x")
    assert status == 502 and error is not None and "cannot connect" in error


def test_client_cancel_completes_the_exchange_once(engine):
    with H2Client(engine.port) as client:
        stream = client.request("/slow/0.3")
        time.sleep(0.05)
        client.reset(stream)
        assert client.response(client.request("/local/after-cancel")).status == 200
    done = _wait_completed(engine, "/slow/0.3")
    time.sleep(0.5)
    assert engine.handler.completions("/slow/0.3") == done
    assert done[0][2] == "the client cancelled the stream"


# HTTP/2 upstreams (h2c)


def test_forwarded_to_an_h2c_upstream_multiplexed(engine):
    engine.origin.requests.clear()

    async def fetch_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
            return await asyncio.gather(
                *(
                    client.post(engine.url(f"/h2up/{i}?n={i}"), content=b"y" * (i * 1000))
                    for i in range(20)
                )
            )

    before = len(engine.origin_connections)
    responses = asyncio.run(fetch_all())
    for i, response in enumerate(responses):
        doc = response.json()
        assert (doc["path"], doc["query"], doc["length"]) == (f"/h2up/{i}", f"n={i}", i * 1000)
        assert doc["http_version"] == "2"
        names = [k for k, _ in doc["headers"]]
        assert "x-forwarded-for" in names and "x-request-id" in names
        assert "host" not in names  # the authority travels as :authority
    # One upstream connection carried them all (it may have been opened by an earlier test).
    assert len(engine.origin_connections) - before <= 1


def test_http1_client_to_an_h2c_upstream(engine):
    with RawClient(engine.port) as client:
        reply = client.exchange(get("/h2up/from-http1"))
        assert reply.status == 200
        assert reply.json()["http_version"] == "2"
        client.send(
            b"POST /h2up/chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        reply = client.read_response()
        assert reply.status == 200
        doc = reply.json()
        assert (doc["length"], doc["sha256"]) == (11, hashlib.sha256(b"hello world").hexdigest())


# flow control


def test_a_slow_reader_pauses_the_upstream(engine):
    total = 64 << 20
    sent = [0]

    def big(req: Received) -> tuple[Any, bool]:
        def pieces() -> Iterator[bytes]:
            yield b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total
            block = b"z" * 65536
            for _ in range(total // len(block)):
                yield block
                sent[0] += len(block)

        return pieces(), False

    engine.recorder.scripts["/up/big"] = big
    with H2Client(engine.port, acknowledge=False, timeout=30) as client:
        stream = client.request("/up/big")
        client.wait(lambda: False, 2.0)  # read what comes, never reopen the windows
        stalled = sent[0]
        assert client.received <= 65535
        assert stalled < 16 << 20, f"the upstream sent {stalled} bytes to a reader that stopped"
        client.acknowledge_all()
        response = client.response(stream, timeout=60)
    assert response.status == 200 and len(response.body) == total
    assert sent[0] == total


def test_a_slow_upstream_stops_the_request_body(engine):
    """An upstream that reads nothing: the client's windows close, nothing piles up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    engine.handler.pools["mute"] = UpstreamPool(
        "127.0.0.1", listener.getsockname()[1], loop=engine.thread.loop
    )
    body = b"w" * (64 << 20)
    try:
        with H2Client(engine.port, timeout=30) as client:
            stream = client.request("/mute/upload", method="POST", end=False)
            sent = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                sent += client.send_body(stream, body[sent : sent + (1 << 20)], end=False)
                client.pump(0.05)
            assert sent < 16 << 20, f"{sent} bytes accepted for an upstream that reads nothing"
            assert sent > 0
    finally:
        for sock in accepted:
            sock.close()
        listener.close()


# gRPC


@pytest.mark.parametrize(
    ("status", "grpc_status"),
    [(401, 16), (403, 7), (404, 12), (429, 8), (413, 8), (502, 14), (503, 14), (504, 4), (500, 13)],
)
def test_refusal_of_a_grpc_call_is_a_trailers_only_status(engine, status, grpc_status):
    with H2Client(engine.port) as client:
        stream = client.request(
            f"/deny/{status}",
            method="POST",
            headers=[("content-type", "application/grpc"), ("te", "trailers")],
            body=b"\x00\x00\x00\x00\x00",
        )
        response = client.response(stream)
    assert response.status == 200 and response.ended and not response.body
    assert response.get("grpc-status") == str(grpc_status)
    assert response.get("grpc-message") == f"refused with {status}"
    assert response.get("content-type") == "application/grpc"
    assert response.get("retry-after") == "7"


def test_refusal_of_a_plain_request_stays_a_problem(engine):
    with H2Client(engine.port) as client:
        response = client.response(client.request("/deny/401"))
    assert response.status == 401
    assert response.get("content-type") == "application/problem+json"
    assert json.loads(response.body)["status"] == 401


def test_grpc_timeout_bounds_the_wait_for_the_upstream(engine):
    def never(req: Received) -> tuple[Any, bool]:
        time.sleep(3)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", False

    engine.recorder.scripts["/up/grpc-slow"] = never
    with H2Client(engine.port) as client:
        started = time.monotonic()
        stream = client.request(
            "/up/grpc-slow",
            method="POST",
            headers=[("content-type", "application/grpc"), ("grpc-timeout", "300m")],
            body=b"\x00\x00\x00\x00\x00",
        )
        response = client.response(stream)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert response.get("grpc-status") == "4"
    assert 0.25 < elapsed < 2.0
    ((_, status, error),) = _wait_completed(engine, "/up/grpc-slow")
    assert status == 504 and error is not None and "grpc-timeout" in error


def test_a_request_body_that_stalls_is_408(engine):
    with H2Client(engine.port) as client:
        stream = client.request("/read/stall", method="POST", body=b"part", end=False)
        started = time.monotonic()
        response = client.response(stream)
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert SETTINGS["body_timeout"] * 0.9 < elapsed < SETTINGS["body_timeout"] + 1.5
        assert client.response(client.request("/local/after-408")).status == 200


def test_request_trailers_reach_an_http1_upstream(engine):
    with H2Client(engine.port) as client:
        stream = client.request("/up/trailers", method="POST", body=b"data", end=False)
        client.conn.send_headers(stream, [(b"x-checksum", b"abc")], end_stream=True)
        client.flush()
        assert client.response(stream).status == 200
    (seen,) = engine.recorder.requests_for("/up/trailers")
    assert seen.header("transfer-encoding") == "chunked"
    assert (seen.body, seen.trailers) == (b"data", [(b"x-checksum", b"abc")])


@pytest.mark.parametrize("alpn", [("h2", "http/1.1"), ("http/1.1",)])
def test_an_h2_upstream_over_tls_is_reached_by_alpn(engine, tmp_path: Path, alpn):
    ca, cert, key = localhost_certificate(tmp_path)
    origin_tls = ServerTls([CertificateFiles(cert, key)], alpn=alpn)
    loop = engine.thread.loop

    async def start() -> Server:
        origin = Server(engine.origin, ServerSettings(), loop=loop, tls=origin_tls)
        await origin.start("127.0.0.1", 0)
        engine.handler.pools["tlsup"] = H2UpstreamPool(
            "127.0.0.1",
            origin.port,
            loop=loop,
            tls=client_context(ca_file=ca, alpn=("h2",)),
            server_name="localhost",
        )
        return origin

    origin = engine.thread.run(start())
    try:
        with H2Client(engine.port) as client:
            response = client.response(client.request("/tlsup/x", method="POST", body=b"sec"))
        if alpn[0] == "h2":
            assert response.status == 200
            doc = json.loads(response.body)
            assert (doc["alpn"], doc["scheme"], doc["length"]) == ("h2", "https", 3)
        else:
            assert response.status == 502
            assert "did not agree to HTTP/2" in json.loads(response.body)["detail"]
    finally:
        engine.thread.run(origin.shutdown(1.0))
