"""An upstream that misbehaves, and a client that leaves early: the client sees a clean
error or a visibly broken connection, and nothing leaks."""

from __future__ import annotations

import os
import socket
import time

import pytest
from harness import rss_kib
from proxy_helpers import Incomplete, RawClient, get, request, wait_until


def _truncated(req):
    return b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"t" * 100, True


def test_upstream_closing_mid_body_breaks_the_client_connection(proxy_env):
    proxy_env.recorder.scripts["/truncated"] = _truncated
    with RawClient(proxy_env.port) as client:
        client.send(get("/rec/truncated"))
        with pytest.raises(Incomplete, match="closed after 100 of 1000 bytes"):
            client.read_response()
    proxy_env.assert_serving()


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("garbage", b"this is not HTTP\r\n\r\n"),
        ("bad-status", b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"),
        ("nothing", b""),
        ("half-head", b"HTTP/1.1 200 OK\r\ncontent-len"),
    ],
)
def test_broken_upstream_response_is_502(proxy_env, name, answer):
    proxy_env.recorder.scripts[f"/broken-{name}"] = lambda req: (answer, True)
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get(f"/rec/broken-{name}"))
        assert reply.status == 502
        assert reply.get("content-type") == "application/problem+json"
        assert client.exchange(get("/rec/after-broken")).status == 200


def _silent_close(req):
    # A complete keep-alive response, then the upstream drops the connection unannounced.
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", True


def test_stale_pooled_connection_is_retried_for_requests_without_body(proxy_env):
    proxy_env.recorder.scripts["/silent-close"] = _silent_close
    with RawClient(proxy_env.port) as client:
        for _ in range(20):
            reply = client.exchange(get("/rec/silent-close"))
            assert (reply.status, reply.body) == (200, b"ok")


def _interim_then_final(req):
    return (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"
    ), False


def test_upstream_interim_responses_are_not_relayed(proxy_env):
    proxy_env.recorder.scripts["/interim"] = _interim_then_final
    with RawClient(proxy_env.port) as client:
        client.send(get("/rec/interim"))
        reply = client.read_response(interim=True)
        assert (reply.status, reply.body) == (200, b"final")
        assert client.exchange(get("/rec/after-interim")).status == 200


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_client_leaving_mid_download_frees_both_connections(proxy_env):
    pid = proxy_env.gateway.proc.pid
    proxy_env.assert_serving()
    before = _fds(pid)
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", proxy_env.port))
        sock.sendall(get(f"/echo/bytes/{1 << 30}"))
        received = 0
        while received < 1 << 20:
            received += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST
    assert wait_until(lambda: _fds(pid) <= before, timeout=3), (_fds(pid), before)
    proxy_env.assert_serving()


def test_pipelined_download_behind_a_slow_reader_keeps_back_pressure(proxy_env):
    """The second response of a paused connection must not be read into memory."""
    pid = proxy_env.gateway.proc.pid
    size = 160 << 20
    with RawClient(proxy_env.port, timeout=30) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(get("/echo/bytes/4000000") + get(f"/echo/bytes/{size}"))
        before = rss_kib(pid)
        reader = client.reader
        head = reader.until(b"\r\n\r\n")
        assert b"content-length: 4000000" in head
        left = 4_000_000
        while left > 0:  # a slow reader: the gateway keeps hitting its write buffer limit
            take = min(left, 16384)
            reader.exactly(take)
            left -= take
            time.sleep(0.0005)
        time.sleep(1.0)  # stop reading while the second response is due
        grown = rss_kib(pid) - before
        head = reader.until(b"\r\n\r\n")
        assert b"content-length: %d" % size in head
        assert client.drain(size) == size
    assert grown < 64 * 1024, f"gateway RSS grew by {grown} KiB while the client was paused"


def test_half_closed_client_gets_its_response_then_the_connection_closes(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(get("/echo/half-1") + get("/echo/half-2"))
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_response().json()["path"] == "/half-1"
        assert client.read_response().json()["path"] == "/half-2"
        start = time.monotonic()
        assert client.closed(timeout=3)
        assert time.monotonic() - start < 0.5, "no reason to wait for the idle timeout"


def test_head_and_local_responses_without_body_keep_the_connection(proxy_env):
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/echo/bytes/100?chunked=1", method="HEAD"), "HEAD")
        assert (reply.status, reply.body) == (200, b"")
        reply = client.exchange(get("/nowhere", method="HEAD"), "HEAD")
        assert reply.status == 404
        assert int(reply.get("content-length") or 0) > 0
        assert client.exchange(get("/echo/after-heads")).json()["path"] == "/after-heads"


def test_requests_pipelined_after_connection_close_are_not_served(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(get("/rec/pipe-close-1", "Connection: close") + get("/rec/pipe-close-2"))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.get("connection") == "close"
        assert client.closed()
    assert len(proxy_env.recorder.requests_for("/pipe-close-1")) == 1
    assert proxy_env.recorder.requests_for("/pipe-close-2") == []
    assert request(proxy_env.port, get("/rec/pipe-close-3")).status == 200
