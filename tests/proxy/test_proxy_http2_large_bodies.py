"""Large bodies both ways over HTTP/2 (h2c) through the gateway process: they stream with
its resident memory bounded, and arrive byte for byte."""

from __future__ import annotations

import hashlib

import httpx
from test_proxy_large_bodies import RssSampler

SIZE = 256 << 20
BLOCK = 1 << 20


def test_large_upload_over_h2_streams_with_bounded_memory(proxy_env):
    block = bytes(range(256)) * (BLOCK // 256)
    expected = hashlib.sha256()
    for _ in range(SIZE // BLOCK):
        expected.update(block)

    def body():
        for _ in range(SIZE // BLOCK):
            yield block

    with (
        httpx.Client(http1=False, http2=True, timeout=60) as client,
        RssSampler(proxy_env.gateway.proc.pid) as rss,
    ):
        response = client.post(f"http://127.0.0.1:{proxy_env.port}/echo/upload", content=body())
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        assert response.json() == {"length": SIZE, "sha256": expected.hexdigest()}
        after = client.get(f"http://127.0.0.1:{proxy_env.port}/echo/after-upload")
        assert after.status_code == 200
    rss.check()


def test_large_download_over_h2_streams_with_bounded_memory(proxy_env):
    expected = hashlib.sha256()
    block = b"x" * 65536
    for _ in range(SIZE // len(block)):
        expected.update(block)
    digest = hashlib.sha256()
    received = 0
    with (
        httpx.Client(http1=False, http2=True, timeout=60) as client,
        RssSampler(proxy_env.gateway.proc.pid) as rss,
    ):
        url = f"http://127.0.0.1:{proxy_env.port}/echo/bytes/{SIZE}"
        with client.stream("GET", url) as response:
            assert response.http_version == "HTTP/2"
            assert response.status_code == 200
            assert response.headers["content-length"] == str(SIZE)
            for chunk in response.iter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert received == SIZE
    assert digest.hexdigest() == expected.hexdigest()
    rss.check()
