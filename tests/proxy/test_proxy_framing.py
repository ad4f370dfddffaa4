"""Message framing through the gateway: chunked both ways, close-delimited responses,
trailers, and Expect: 100-continue answered after the access decision."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
from proxy_helpers import RawClient, chunked, get


def test_chunked_request_body_reaches_the_upstream_intact(proxy_env):
    pieces = [os.urandom(n) for n in (1, 17, 4096, 65536, 100_003, 3)]
    body = b"".join(pieces)
    head = b"POST /echo/upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawClient(proxy_env.port) as client:
        client.send(head)
        for piece in pieces:  # in separate writes, so the body streams
            client.send(chunked(piece)[: -len(b"0\r\n\r\n")])
            time.sleep(0.01)
        client.send(b"0\r\nX-Checksum: abc\r\n\r\n")
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        # The connection is reusable after a chunked request.
        assert client.exchange(get("/echo/next")).json()["path"] == "/next"


def test_chunked_request_is_forwarded_chunked_without_trailers(proxy_env):
    data = b"POST /rec/chunked-in HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += chunked(b"hello ", b"world", trailers=b"X-Trailer: secret\r\n")
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(data)
    assert reply.status == 200
    (seen,) = proxy_env.recorder.requests_for("/chunked-in")
    assert seen.body == b"hello world"
    assert seen.header("transfer-encoding") == "chunked"
    assert seen.header_names().count("transfer-encoding") == 1
    assert "content-length" not in seen.header_names()
    assert seen.trailers == []
    assert "x-trailer" not in seen.header_names()


def test_chunked_response_is_rechunked_for_http11_and_close_delimited_for_http10(proxy_env):
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/echo/bytes/200000?chunked=1"))
        assert reply.status == 200
        assert reply.chunked and reply.get("content-length") is None
        assert reply.body == b"x" * 200_000
        assert client.exchange(get("/echo/bytes/3")).body == b"xxx"
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(b"GET /echo/bytes/200000?chunked=1 HTTP/1.0\r\n\r\n")
        assert reply.status == 200
        assert reply.get("transfer-encoding") is None
        assert reply.get("content-length") is None
        assert reply.get("connection") == "close"
        assert reply.body == b"x" * 200_000  # read until the gateway closed


def _close_delimited(req):
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n" + b"until close" * 1000, True


def test_close_delimited_response_becomes_chunked_for_http11(proxy_env):
    proxy_env.recorder.scripts["/eof-body"] = _close_delimited
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/rec/eof-body"))
        assert reply.status == 200
        assert reply.chunked
        assert reply.body == b"until close" * 1000
        assert reply.get("connection") is None
        assert client.exchange(get("/rec/after-eof")).status == 200
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(b"GET /rec/eof-body HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert reply.get("connection") == "close"
        assert reply.get("transfer-encoding") is None
        assert reply.body == b"until close" * 1000


def _chunked_with_trailers(req):
    return (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-digest\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-digest: abc\r\nx-more: 1\r\n\r\n"
    ), False


def test_upstream_trailers_are_dropped(proxy_env):
    proxy_env.recorder.scripts["/trailers"] = _chunked_with_trailers
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/rec/trailers"))
        assert reply.body == b"hello world"
        assert reply.chunked
        assert reply.trailers == []
        assert reply.get("trailer") is None
        assert client.exchange(get("/rec/after-trailers")).status == 200


def test_chunked_response_through_httpx(proxy_env):
    response = httpx.get(f"{proxy_env.gateway.url}/echo/bytes/1000000?chunked=1")
    assert response.status_code == 200
    assert response.content == b"x" * 1_000_000


EXPECT_HEAD = (
    "POST /api/expect-{name} HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 11\r\n"
    "Expect: 100-continue\r\n{key}\r\n"
)


def test_expect_100_continue_after_access_is_granted(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(EXPECT_HEAD.format(key="X-API-Key: k1\r\n", name="granted").encode())
        interim = client.read_response(interim=True)
        assert interim.status == 100
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello world")
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json()["length"] == 11
        assert client.exchange(get("/api/again", "X-API-Key: k1")).status == 200
    (seen,) = proxy_env.recorder.requests_for("/expect-granted")
    assert seen.body == b"hello world"
    assert "expect" not in seen.header_names()


def test_expect_100_continue_refused_gets_final_status_and_close(proxy_env):
    for key, status in (("", 401), ("X-API-Key: wrong\r\n", 403)):
        with RawClient(proxy_env.port) as client:
            client.send(EXPECT_HEAD.format(key=key, name=f"refused-{status}").encode())
            reply = client.read_response(interim=True)
            assert reply.status == status, reply
            assert reply.get("content-type") == "application/problem+json"
            assert reply.get("connection") == "close"
            assert client.closed()
        assert proxy_env.recorder.requests_for(f"refused-{status}") == []
