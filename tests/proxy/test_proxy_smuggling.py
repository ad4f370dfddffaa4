"""Request smuggling and malformed messages: each is refused with 400 (501 for a transfer
coding the gateway does not implement), the connection is closed, nothing reaches the
upstream, and the gateway goes on serving."""

from __future__ import annotations

import random

import pytest
from proxy_helpers import Incomplete, RawClient, request

HIDDEN = b"GET /rec/hidden HTTP/1.1\r\nHost: gw.test\r\n\r\n"


def _post(name: str, fields: str, body: bytes = b"") -> bytes:
    head = f"POST /rec/smuggle-{name} HTTP/1.1\r\nHost: gw.test\r\n{fields}\r\n"
    return head.encode("latin-1") + body


CASES: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "cl-te": (
        _post(
            "cl-te", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + HIDDEN
        ),
        (400,),
    ),
    "te-cl": (
        _post(
            "te-cl", "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n" + HIDDEN
        ),
        (400,),
    ),
    "two-cl": (
        _post("two-cl", "Content-Length: 5\r\nContent-Length: 44\r\n", b"hello" + HIDDEN),
        (400,),
    ),
    "two-same-cl": (
        _post("two-same-cl", "Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        (400,),
    ),
    "cl-list": (_post("cl-list", "Content-Length: 5, 44\r\n", b"hello" + HIDDEN), (400,)),
    "cl-plus": (_post("cl-plus", "Content-Length: +5\r\n", b"hello"), (400,)),
    "cl-hex": (_post("cl-hex", "Content-Length: 0x5\r\n", b"hello"), (400,)),
    "cl-negative": (_post("cl-negative", "Content-Length: -1\r\n", b"hello"), (400,)),
    "cl-overflow": (
        _post("cl-overflow", "Content-Length: 99999999999999999999999\r\n", b"hello"),
        (400,),
    ),
    "te-chunked-identity": (
        _post("te-chunked-identity", "Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        (400, 501),
    ),
    "te-identity-chunked": (
        _post("te-identity-chunked", "Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"),
        (400, 501),
    ),
    "te-xchunked": (
        _post("te-xchunked", "Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
        (400, 501),
    ),
    "te-gzip": (_post("te-gzip", "Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"), (400, 501)),
    "te-twice": (
        _post(
            "te-twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"
        ),
        (400, 501),
    ),
    "te-http10": (
        b"POST /rec/smuggle-te-http10 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        (400, 501),
    ),
    "chunk-size-zz": (
        _post("chunk-size-zz", "Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
        (400,),
    ),
    "chunk-size-negative": (
        _post("chunk-size-negative", "Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
        (400,),
    ),
    "chunk-size-overflow": (
        _post(
            "chunk-size-overflow",
            "Transfer-Encoding: chunked\r\n",
            b"10000000000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
        (400,),
    ),
    "chunk-size-bare-lf": (
        _post("chunk-size-bare-lf", "Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
        (400,),
    ),
    "chunk-data-too-long": (
        _post(
            "chunk-data-too-long", "Transfer-Encoding: chunked\r\n", b"5\r\nhello!!\r\n0\r\n\r\n"
        ),
        (400,),
    ),
    "request-line-extra": (
        b"GET /rec/smuggle-request-line-extra HTTP/1.1 x\r\nHost: a\r\n\r\n",
        (400,),
    ),
    "request-line-no-version": (
        b"GET /rec/smuggle-request-line-no-version\r\nHost: a\r\n\r\n",
        (400, 505),
    ),
    "request-line-bad-version": (
        b"GET /rec/smuggle-request-line-bad-version HTTP/1.x\r\n\r\n",
        (400,),
    ),
    "request-line-bad-method": (
        b"G(T /rec/smuggle-request-line-bad-method HTTP/1.1\r\n\r\n",
        (400,),
    ),
    "request-line-nul": (
        b"GET /rec/smuggle-request-line-nul\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
        (400,),
    ),
    "bare-lf-everywhere": (b"GET /rec/smuggle-bare-lf-everywhere HTTP/1.1\nHost: a\n\n", (400,)),
    "bare-lf-in-headers": (
        b"GET /rec/smuggle-bare-lf-in-headers HTTP/1.1\r\nHost: a\nX-Y: z\r\n\r\n",
        (400,),
    ),
    "bare-cr": (b"GET /rec/smuggle-bare-cr HTTP/1.1\r\nHost: a\rX-Y: z\r\n\r\n", (400,)),
    "obs-fold": (
        b"GET /rec/smuggle-obs-fold HTTP/1.1\r\nHost: a\r\nX-Y: z\r\n folded\r\n\r\n",
        (400,),
    ),
    "obs-fold-cl": (
        _post("obs-fold-cl", "Content-Length:\r\n 5\r\n", b"hello"),
        (400,),
    ),
    "space-before-colon": (
        b"GET /rec/smuggle-space-before-colon HTTP/1.1\r\nHost : a\r\n\r\n",
        (400,),
    ),
    "space-before-colon-te": (
        _post("space-before-colon-te", "Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
        (400,),
    ),
    "header-name-bad-char": (
        b"GET /rec/smuggle-header-name-bad-char HTTP/1.1\r\nHost: a\r\nX(Y): z\r\n\r\n",
        (400,),
    ),
    "header-value-nul": (
        b"GET /rec/smuggle-header-value-nul HTTP/1.1\r\nHost: a\r\nX-Y: a\x00b\r\n\r\n",
        (400,),
    ),
    "no-host": (b"GET /rec/smuggle-no-host HTTP/1.1\r\n\r\n", (400,)),
    "two-hosts": (b"GET /rec/smuggle-two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", (400,)),
    "connect-method": (
        b"CONNECT smuggle-connect-method.example:443 HTTP/1.1\r\n"
        b"Host: smuggle-connect-method.example:443\r\n\r\n",
        (400, 501),
    ),
    "expect-unknown": (
        b"GET /rec/smuggle-expect-unknown HTTP/1.1\r\nHost: a\r\nExpect: nope\r\n\r\n",
        (417,),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_smuggling_attempt_is_refused_and_never_forwarded(proxy_env, name):
    data, statuses = CASES[name]
    with RawClient(proxy_env.port) as client:
        client.send(data)
        reply = client.read_response()
        assert reply.status in statuses, (name, reply.head)
        assert reply.get("content-type") == "application/problem+json"
        assert reply.get("connection") == "close"
        assert client.closed(), "the connection must not be reused after a framing error"
    assert proxy_env.recorder.requests_for(f"smuggle-{name}") == []
    assert proxy_env.recorder.requests_for("/hidden") == []
    proxy_env.assert_serving()


def test_smuggling_after_a_good_request_on_the_same_connection(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(
            b"GET /rec/before-smuggle HTTP/1.1\r\nHost: gw.test\r\n\r\n"
            + CASES["cl-te"][0].replace(b"smuggle-cl-te", b"smuggle-after-good")
        )
        assert client.read_response().status == 200
        assert client.read_response().status == 400
        assert client.closed()
    assert len(proxy_env.recorder.requests_for("/before-smuggle")) == 1
    assert proxy_env.recorder.requests_for("smuggle-after-good") == []
    assert proxy_env.recorder.requests_for("/hidden") == []


def test_bad_chunk_in_a_queued_request_after_a_good_one(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(
            b"GET /echo/delay/0.2 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
            + _post("queued-bad-chunk", "Transfer-Encoding: chunked\r\n", b"zz\r\n" + HIDDEN)
        )
        assert client.read_response().json() == {"delayed": True}
        reply = client.read_response()
        assert reply.status == 400
        assert reply.get("connection") == "close"
        assert client.closed()
    assert proxy_env.recorder.requests_for("smuggle-queued-bad-chunk") == []
    assert proxy_env.recorder.requests_for("/hidden") == []


def test_bad_chunk_after_the_head_was_forwarded_never_completes_upstream(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(_post("late-bad-chunk", "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"))
        proxy_env.recorder.wait_for("smuggle-late-bad-chunk")
        client.send(b"zz\r\n" + HIDDEN)
        reply = client.read_response()
        assert reply.status in (400, 502)
        assert client.closed()
    (seen,) = proxy_env.recorder.requests_for("smuggle-late-bad-chunk")
    assert not seen.complete
    assert proxy_env.recorder.requests_for("/hidden") == []
    proxy_env.assert_serving()


def test_random_garbage_leaves_the_gateway_serving(proxy_env):
    rng = random.Random(1234)
    alphabet = b"GET POST HTTP/1.1\r\n:;, \t\x00\x7f\xff0123456789abcdefchunked-Length"
    for _ in range(60):
        size = rng.randint(1, 400)
        junk = bytes(rng.choice(alphabet) for _ in range(size))
        try:
            with RawClient(proxy_env.port, timeout=3) as client:
                client.send(junk)
                client.closed(timeout=1.5)
        except (Incomplete, OSError):
            pass
    proxy_env.assert_serving()
    assert request(proxy_env.port, b"GET /echo/x HTTP/1.1\r\nHost: a\r\n\r\n").status == 200
