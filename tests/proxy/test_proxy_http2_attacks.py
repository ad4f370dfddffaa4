"""HTTP/2 attacks on the engine, with frames written by hand or by the h2 library: each
ends the attacker's connection (or stream) at a bound, and the server goes on serving.

- rapid reset (CVE-2023-44487): streams opened and cancelled in a loop;
- CONTINUATION flood (CVE-2024-27316): a header block that never ends;
- HPACK bomb: a small header block that decodes to a huge header list;
- a header block trickled in slower than the header timeout;
- invalid frames;
plus the connection's own lifetime: the header and idle timeouts, and a graceful GOAWAY
when the server shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2_support import SETTINGS, Engine, H2Client, running_engine
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)
from proxy_helpers import wait_until

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"gw.test"),
    (b":path", b"/local/attack"),
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with running_engine() as engine:
        yield engine


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="meshgate")
    yield
    traced = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not traced, [r.getMessage() for r in traced]


def _settled(client: H2Client) -> None:
    """Wait for the server's SETTINGS, as a client that means no harm."""
    assert client.wait(lambda: client.conn.remote_settings.max_concurrent_streams < 1000, 3)


def test_rapid_reset_is_cut_off_at_a_bound(engine, no_tracebacks):
    handled = engine.handler.handled
    opened = 0
    started = time.monotonic()
    with H2Client(engine.port) as client:
        _settled(client)
        try:
            for _ in range(5000):
                stream = client.request("/slow/5")  # would hold the stream open for seconds
                client.reset(stream)
                opened += 1
                if opened % 20 == 0:
                    client.pump(0.001)
                if client.closed or client.goaway is not None:
                    break
        except (OSError, ProtocolError):
            pass  # the server closed the connection under us
        assert client.closed_within(5)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # Bounded work: the handler ran for no more than the resets the engine tolerates.
    limit = 2 * SETTINGS["max_concurrent_streams"]
    assert engine.handler.handled - handled <= limit + 1
    assert opened < 5000
    assert time.monotonic() - started < 10
    engine.assert_serving()


def test_cancels_below_the_bound_are_not_an_attack(engine):
    """A client may cancel streams it no longer needs: under the bound, it is served on."""
    with H2Client(engine.port) as client:
        _settled(client)
        for _ in range(2 * SETTINGS["max_concurrent_streams"]):
            stream = client.request("/slow/2")
            client.pump(0.05)
            client.reset(stream)
        assert client.response(client.request("/local/still-open")).status == 200
        assert client.goaway is None


def _headers_without_end(stream_id: int) -> bytes:
    frame = HeadersFrame(stream_id, data=Encoder().encode(REQUEST))
    frame.flags.add("END_STREAM")
    return frame.serialize()


def test_continuation_flood_is_cut_off_at_the_header_limit(engine, no_tracebacks):
    handled = engine.handler.handled
    with H2Client(engine.port) as client:
        _settled(client)
        client.send_raw(_headers_without_end(1))
        started = time.monotonic()
        try:
            # h2 alone would buffer 64 such frames (1 MiB); the header limit is 4 KiB.
            for _ in range(10):
                client.send_raw(ContinuationFrame(1, data=b"\x00" * 1000).serialize())
        except OSError:
            pass
        assert client.closed_within(3)
        assert time.monotonic() - started < 0.9, "cut off by the header timeout, not the limit"
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert engine.handler.handled == handled  # nothing reached the handler
    engine.assert_serving()


def test_a_header_block_trickled_in_is_cut_off_by_the_header_timeout(engine, no_tracebacks):
    with H2Client(engine.port) as client:
        _settled(client)
        client.send_raw(_headers_without_end(1))
        started = time.monotonic()
        try:
            while time.monotonic() - started < 4:
                client.send_raw(ContinuationFrame(1, data=b"\x00").serialize())
                if not client.pump(0.2):
                    break
        except OSError:
            pass
        assert client.closed_within(2)
        elapsed = time.monotonic() - started
        assert SETTINGS["header_timeout"] * 0.9 < elapsed < SETTINGS["header_timeout"] + 1.5
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    engine.assert_serving()


def test_hpack_bomb_is_refused_by_the_header_list_limit(engine, no_tracebacks):
    handled = engine.handler.handled
    encoder = Encoder()
    # One 3 KB field into the dynamic table, then 15 one-byte references to it: 3 KB on
    # the wire, 48 KB decoded (under h2's own default of 64 KiB, over the 4 KiB limit).
    block = encoder.encode([*REQUEST, (b"x-bomb", b"b" * 3000)])
    block += encoder.encode([(b"x-bomb", b"b" * 3000)] * 15)
    assert len(block) < 3300
    frame = HeadersFrame(1, data=block)
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    with H2Client(engine.port) as client:
        _settled(client)
        client.send_raw(frame.serialize())
        assert client.closed_within(3)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert engine.handler.handled == handled
    engine.assert_serving()


def test_a_header_list_over_the_limit_from_a_plain_client_is_refused(engine, no_tracebacks):
    with H2Client(engine.port) as client:
        _settled(client)
        try:
            client.request("/local/big", headers=[("x-big", "v" * 5000)])
        except OSError:
            pass
        assert client.closed_within(3)
        assert client.goaway is not None and client.goaway.error_code != ErrorCodes.NO_ERROR
    engine.assert_serving()


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


INVALID = {
    "DATA on stream 0": _frame(0x0, 0x1, 0, b"hello"),
    "SETTINGS of 5 bytes": _frame(0x4, 0x0, 0, b"\x00\x03\x00\x00\x00"),
    "WINDOW_UPDATE of 0": _frame(0x8, 0x0, 0, b"\x00\x00\x00\x00"),
    "HEADERS on an even stream": _frame(0x1, 0x5, 2, Encoder().encode(REQUEST)),
    "PING of 3 bytes": _frame(0x6, 0x0, 0, b"abc"),
    "a frame over the size limit": _frame(0x0, 0x0, 1, b"d" * 20000),
    "RST_STREAM on an idle stream": _frame(0x3, 0x0, 7, b"\x00\x00\x00\x08"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_frames_end_the_connection_with_goaway(engine, no_tracebacks, name):
    with H2Client(engine.port) as client:
        _settled(client)
        client.send_raw(INVALID[name])
        assert client.closed_within(3), name
        assert client.goaway is not None, name
        assert client.goaway.error_code != ErrorCodes.NO_ERROR
    engine.assert_serving()


def test_a_bad_preface_is_not_http2(engine):
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock:
        sock.sendall(PREFACE[:20] + b"XXXX")
        sock.settimeout(3)
        data = sock.recv(65536)
        # Not the preface: read as HTTP/1.1, and refused as such.
        assert data.startswith(b"HTTP/1.1 4") or data == b""
    engine.assert_serving()


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(engine):
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock:
        sock.sendall(PREFACE)
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        elapsed = time.monotonic() - started
    assert SETTINGS["header_timeout"] * 0.9 < elapsed < SETTINGS["header_timeout"] + 1.5
    assert data  # the server's SETTINGS, then its GOAWAY


def test_an_idle_connection_is_closed_with_goaway(engine):
    with H2Client(engine.port) as client:
        assert client.response(client.request("/local/before-idle")).status == 200
        started = time.monotonic()
        assert client.closed_within(SETTINGS["idle_timeout"] + 2)
        assert time.monotonic() - started > SETTINGS["idle_timeout"] * 0.9
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR


def test_shutdown_sends_goaway_and_lets_open_streams_finish():
    with running_engine() as engine:
        with H2Client(engine.port) as client:
            stream = client.request("/slow/0.6")
            assert client.wait(lambda: engine.handler.handled == 1, 3)
            shutdown = asyncio.run_coroutine_threadsafe(
                engine.server.shutdown(5.0), engine.thread.loop
            )
            assert client.wait(lambda: client.goaway is not None, 3)
            assert client.goaway.error_code == ErrorCodes.NO_ERROR
            assert client.goaway.last_stream_id == stream
            response = client.response(stream)
            assert (response.status, bytes(response.body)) == (200, b"slow")
            assert client.closed_within(3)
            shutdown.result(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", engine.port), timeout=2)


def _read_frames(sock: socket.socket, buffer: bytearray) -> list[Frame]:
    """The frames that arrived (whole ones), parsed by hyperframe."""
    sock.settimeout(3)
    chunk = sock.recv(65536)
    if not chunk:
        raise EOFError
    buffer += chunk
    frames = []
    while len(buffer) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
        if len(buffer) < 9 + length:
            break
        frame.parse_body(memoryview(buffer[9 : 9 + length]))
        del buffer[: 9 + length]
        frames.append(frame)
    return frames


def test_a_stream_opened_after_goaway_is_refused():
    """Written frame by frame: h2 itself opens no stream once it received GOAWAY."""
    with (
        running_engine() as engine,
        socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock,
    ):
        headers = HeadersFrame(1, data=Encoder().encode([*REQUEST[:3], (b":path", b"/slow/0.5")]))
        headers.flags.add("END_HEADERS")
        headers.flags.add("END_STREAM")
        sock.sendall(PREFACE + SettingsFrame(0).serialize() + headers.serialize())
        assert wait_until(lambda: engine.handler.handled == 1)
        shutdown = asyncio.run_coroutine_threadsafe(engine.server.shutdown(5.0), engine.thread.loop)
        buffer = bytearray()
        seen: list[Frame] = []
        while not any(isinstance(f, GoAwayFrame) for f in seen):
            seen += _read_frames(sock, buffer)
        late = HeadersFrame(3, data=Encoder().encode(REQUEST))
        late.flags.add("END_HEADERS")
        late.flags.add("END_STREAM")
        sock.sendall(late.serialize())
        while not any(isinstance(f, DataFrame) and "END_STREAM" in f.flags for f in seen):
            seen += _read_frames(sock, buffer)
        shutdown.result(5)
    (goaway,) = [f for f in seen if isinstance(f, GoAwayFrame)]
    assert (goaway.error_code, goaway.last_stream_id) == (0, 1)
    resets = [f for f in seen if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(3, ErrorCodes.REFUSED_STREAM)]
    assert b"".join(f.data for f in seen if isinstance(f, DataFrame) and f.stream_id == 1) == (
        b"slow"
    )
