"""Connection management: keep-alive on both sides, HTTP/1.0, Connection: close,
pipelining, responses without a body, and many connections at once."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from proxy_helpers import RawClient, get, request


def test_one_client_connection_serves_many_requests_over_one_upstream_connection(proxy_env):
    recorder = proxy_env.recorder
    with RawClient(proxy_env.port) as client:
        for i in range(5):
            reply = client.exchange(get(f"/rec/ka-{i}"))
            assert reply.status == 200
            assert reply.get("connection") is None
            assert reply.json()["target"] == f"/ka-{i}"
    # Two more client connections, one after the other: the idle upstream one is reused.
    for i in range(5, 7):
        assert request(proxy_env.port, get(f"/rec/ka-{i}")).status == 200
    seen = recorder.requests_for("/ka-")
    assert [r.target for r in seen] == [f"/ka-{i}" for i in range(7)]
    assert len({r.connection for r in seen}) == 1, "every request should reuse one upstream"


def test_http10_client_without_keepalive_gets_close(proxy_env):
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(b"GET /echo/old HTTP/1.0\r\n\r\n")
        assert reply.status == 200
        assert reply.head.startswith(b"HTTP/1.1 200 ")
        assert reply.get("connection") == "close"
        assert reply.json()["path"] == "/old"
        assert client.closed()


def test_http10_client_with_keepalive_keeps_the_connection(proxy_env):
    with RawClient(proxy_env.port) as client:
        for i in range(3):
            reply = client.exchange(
                f"GET /echo/old-ka-{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
            )
            assert reply.status == 200
            assert reply.get("connection") == "keep-alive"
            assert reply.json()["path"] == f"/old-ka-{i}"
            # The upstream hop is HTTP/1.1 with a Host even though the client sent none.
            assert reply.json()["headers"]["host"] == f"127.0.0.1:{proxy_env.echo_port}"


def test_connection_close_closes_after_the_response_only_on_the_client_side(proxy_env):
    recorder = proxy_env.recorder
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(get("/rec/close-1", "Connection: close"))
        assert reply.status == 200
        assert reply.get("connection") == "close"
        assert client.closed()
    assert request(proxy_env.port, get("/rec/close-2")).status == 200
    first, second = recorder.requests_for("/close-")
    assert first.header("connection") is None
    assert first.connection == second.connection, "the upstream connection stays pooled"


def test_pipelined_requests_are_answered_in_order(proxy_env):
    batch = (
        get("/echo/delay/0.2")
        + b"POST /echo/upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello"
        + get("/echo/bytes/100", method="HEAD")
        + get("/echo/status/204")
        + get("/echo/last")
    )
    with RawClient(proxy_env.port) as client:
        client.send(batch)
        delayed = client.read_response()
        upload = client.read_response()
        head = client.read_response("HEAD")
        empty = client.read_response()
        last = client.read_response()
        assert delayed.json() == {"delayed": True}
        assert upload.json()["length"] == 5
        assert (head.status, head.get("content-length"), head.body) == (200, "100", b"")
        assert (empty.status, empty.body) == (204, b"")
        assert last.json()["path"] == "/last"
        ids = {r.get("x-request-id") for r in (delayed, upload, head, empty, last)}
        assert len(ids) == 5
        # Nothing extra arrived and the connection is still usable.
        assert client.exchange(get("/echo/after")).json()["path"] == "/after"


def test_malformed_request_behind_a_good_one_does_not_spoil_it(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(get("/echo/delay/0.1") + b"GARBAGE\r\n\r\n")
        first = client.read_response()
        assert first.status == 200
        assert first.json() == {"delayed": True}
        second = client.read_response()
        assert second.status == 400
        assert second.get("content-type") == "application/problem+json"
        assert client.closed()


def test_head_passes_content_length_without_body_and_keeps_the_connection(proxy_env):
    with RawClient(proxy_env.port) as client:
        for _ in range(2):
            head = client.exchange(get("/echo/bytes/5000", method="HEAD"), "HEAD")
            assert head.status == 200
            assert head.get("content-length") == "5000"
            assert head.get("transfer-encoding") is None
        # If any body byte had followed the HEAD response this GET would read it.
        body = client.exchange(get("/echo/bytes/7"))
        assert (body.status, body.body) == (200, b"x" * 7)


def test_204_and_304_from_upstream_have_no_body_and_keep_the_connection(proxy_env):
    recorder = proxy_env.recorder
    recorder.scripts["/not-modified"] = lambda req: (
        b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\ncontent-length: 1234\r\n\r\n',
        False,
    )
    with RawClient(proxy_env.port) as client:
        for path in ("/echo/status/204", "/echo/status/304", "/rec/not-modified"):
            reply = client.exchange(get(path))
            assert reply.status in (204, 304)
            assert reply.get("transfer-encoding") is None
        assert reply.get("etag") == '"v1"'
        assert reply.get("content-length") == "1234"  # allowed on 304, no body follows
        assert client.exchange(get("/echo/after-304")).json()["path"] == "/after-304"
    # Same for an HTTP/1.0 client with keep-alive.
    with RawClient(proxy_env.port) as client:
        reply = client.exchange(b"GET /echo/status/204 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (reply.status, reply.get("connection")) == (204, "keep-alive")
        assert client.exchange(get("/echo/again")).status == 200


def test_two_hundred_concurrent_connections_are_all_answered(proxy_env):
    async def one(i: int) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_env.port)
        writer.write(get(f"/echo/many-{i}", "Connection: close"))
        data = await asyncio.wait_for(reader.read(-1), 20)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body)["path"]

    async def all_of_them() -> list[tuple[int, str]]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(all_of_them())
    assert results == [(200, f"/many-{i}") for i in range(200)]
    proxy_env.assert_serving()


BIG = (8 << 20) + 100_000


def _big(req):
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG + b"B" * BIG, False


def test_upstream_connection_is_reused_after_a_response_slowed_by_back_pressure(proxy_env):
    recorder = proxy_env.recorder
    for i in range(3):
        recorder.scripts[f"/big-{i}"] = _big
    with RawClient(proxy_env.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        for i in range(3):
            client.send(get(f"/rec/big-{i}"))
            # A slow reader: the gateway's write buffer stays full, the upstream paused.
            head = client.reader.until(b"\r\n\r\n")
            assert b"content-length: %d" % BIG in head
            left = BIG
            while left:
                take = min(left, 32768)
                client.reader.exactly(take)
                left -= take
                time.sleep(0.0002)
    seen = recorder.requests_for("/big-")
    assert len(seen) == 3
    assert len({r.connection for r in seen}) == 1, "the upstream connection was not reused"
