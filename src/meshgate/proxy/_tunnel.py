"""A byte tunnel between two transports: what a connection becomes after a protocol upgrade.

Once the upstream has answered ``101 Switching Protocols`` both transports are handed to
a :class:`Tunnel`, which becomes their protocol: bytes are copied as they come, a side
whose write buffer fills pauses reading on the other (so memory stays bounded whatever
the two peers do), a half-close is passed on, and no byte either way within the idle
timeout closes both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Tunnel"]


class _Side(asyncio.Protocol):
    """One transport of the tunnel; what it reads goes to the other side."""

    __slots__ = ("tunnel", "transport", "peer", "received", "eof")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _Side | None = None
        self.received = 0
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.tunnel.active = True
        assert self.peer is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        assert self.peer is not None
        if self.peer.eof:
            self.tunnel.close()
            return False
        if not self.peer.transport.can_write_eof():
            self.tunnel.close()  # TLS cannot half-close: close once the buffer is sent
            return False
        self.peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        # This side cannot take more: stop reading what would be written to it.
        assert self.peer is not None
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close(None if exc is None else f"{exc}")


class Tunnel:
    """Copies bytes between ``client`` and ``upstream`` until either closes or both are idle
    for ``idle_timeout`` seconds; then calls ``on_close(bytes from the client, bytes from
    the upstream, error or None)`` once."""

    __slots__ = ("client", "upstream", "idle_timeout", "active", "_loop", "_timer", "_on_close")

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        idle_timeout: float,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[int, int, str | None], None],
    ) -> None:
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.idle_timeout = idle_timeout
        self.active = False
        self._loop = loop
        self._on_close: Callable[[int, int, str | None], None] | None = on_close
        client.set_protocol(self.client)
        upstream.set_protocol(self.upstream)
        self._timer: asyncio.TimerHandle | None = loop.call_later(idle_timeout, self._check)

    def send_upstream(self, data: bytes) -> None:
        """Bytes the client sent before the tunnel opened (read with the upgrade request)."""
        if data:
            self.client.received += len(data)
            self.upstream.transport.write(data)

    def send_client(self, data: bytes) -> None:
        """Bytes the upstream sent with its 101 head."""
        if data:
            self.upstream.received += len(data)
            self.client.transport.write(data)

    def _check(self) -> None:
        if self.active:
            self.active = False
            self._timer = self._loop.call_later(self.idle_timeout, self._check)
            return
        self._timer = None
        self.close(f"no bytes either way for {self.idle_timeout}s")

    def close(self, error: str | None = None) -> None:
        """Close both sides (what is already written is still sent) and report, once."""
        on_close, self._on_close = self._on_close, None
        if on_close is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for side in (self.client, self.upstream):
            transport = side.transport
            if not transport.is_closing():
                transport.close()
            if transport.get_write_buffer_size():
                # What is buffered still goes out, within the idle timeout: a peer that
                # reads nothing cannot hold the socket open after the tunnel has closed.
                self._loop.call_later(self.idle_timeout, transport.abort)
        on_close(self.client.received, self.upstream.received, error)

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            side.transport.abort()
        self.close("aborted")
