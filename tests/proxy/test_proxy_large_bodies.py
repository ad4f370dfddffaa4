"""Bodies of 1 GiB both ways, by length and chunked: they stream through the gateway
with its resident memory bounded, and arrive byte for byte."""

from __future__ import annotations

import hashlib
import threading

import pytest
from harness import rss_kib
from proxy_helpers import RawClient, get

GIB = 1 << 30
BLOCK = 1 << 20
RSS_BOUND_KIB = 64 * 1024


class RssSampler:
    """Samples a process's VmRSS every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = rss_kib(pid)
        self.peak = self.idle
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        assert self.samples > 10
        growth = self.peak - self.idle
        assert growth < RSS_BOUND_KIB, f"gateway RSS grew by {growth} KiB during the transfer"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_one_gib_upload_streams_with_bounded_memory(proxy_env, framing):
    block = bytes(range(256)) * (BLOCK // 256)
    expected = hashlib.sha256()
    for _ in range(GIB // BLOCK):
        expected.update(block)
    head = b"POST /echo/upload HTTP/1.1\r\nHost: gw.test\r\n"
    if framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        piece = b"%x\r\n%s\r\n" % (len(block), block)
    else:
        head += b"Content-Length: %d\r\n\r\n" % GIB
        piece = block
    with (
        RawClient(proxy_env.port, timeout=60) as client,
        RssSampler(proxy_env.gateway.proc.pid) as rss,
    ):
        client.send(head)
        for _ in range(GIB // BLOCK):
            client.send(piece)
        if framing == "chunked":
            client.send(b"0\r\n\r\n")
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json() == {"length": GIB, "sha256": expected.hexdigest()}
        assert client.exchange(get("/echo/after-upload")).status == 200
    rss.check()


def _expected_download() -> str:
    digest = hashlib.sha256()
    block = b"x" * 65536
    for _ in range(GIB // len(block)):
        digest.update(block)
    return digest.hexdigest()


def _read_length(client: RawClient, digest: hashlib._Hash, size: int) -> int:
    received = len(client.reader.buf)
    digest.update(client.reader.buf)
    client.reader.buf.clear()
    buf = bytearray(4 * BLOCK)
    view = memoryview(buf)
    while received < size:
        n = client.sock.recv_into(view)
        assert n, f"connection closed after {received} bytes"
        digest.update(view[:n])
        received += n
    return received


def _read_chunked(client: RawClient, digest: hashlib._Hash) -> int:
    received = 0
    reader = client.reader
    while size := int(reader.until(b"\r\n")[:-2], 16):
        digest.update(reader.exactly(size))
        assert reader.exactly(2) == b"\r\n"
        received += size
    assert reader.until(b"\r\n") == b"\r\n"  # no trailers
    return received


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_one_gib_download_streams_with_bounded_memory(proxy_env, framing):
    expected = _expected_download()
    query = "?chunked=1" if framing == "chunked" else ""
    with (
        RawClient(proxy_env.port, timeout=60) as client,
        RssSampler(proxy_env.gateway.proc.pid) as rss,
    ):
        client.send(get(f"/echo/bytes/{GIB}{query}"))
        head = client.reader.until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        digest = hashlib.sha256()
        if framing == "chunked":
            assert b"transfer-encoding: chunked\r\n" in head
            received = _read_chunked(client, digest)
        else:
            assert b"content-length: %d\r\n" % GIB in head
            received = _read_length(client, digest, GIB)
        assert received == GIB
        assert digest.hexdigest() == expected
        # The connection is still in step: the next response starts right after.
        assert client.exchange(get("/echo/after-download")).status == 200
    rss.check()
