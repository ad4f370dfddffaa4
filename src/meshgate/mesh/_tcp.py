"""Plain TCP through the mesh: a connection goes to an instance its service's cluster picks.

A database or a broker behind a sidecar is called as TCP: no requests to route, but the
same discovery, load balancing (a consistent hash on the source address keeps a client on
one instance), connection caps and outlier detection. Bytes flow both ways with back
pressure (each side pauses reading the other) and half-closes are passed on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshgate.mesh._cluster import Endpoint
    from meshgate.mesh._metrics import MeshMetrics
    from meshgate.mesh._traffic import ServiceRuntime

__all__ = ["TcpProxy", "CONNECT_ATTEMPTS"]

log = logging.getLogger("meshgate.mesh.tcp")

# An instance that refuses the connection is skipped for another, this many times in all.
CONNECT_ATTEMPTS = 3


class _Peer(asyncio.Protocol):
    """The upstream side of a proxied connection."""

    def __init__(self, client: TcpProxy) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.sent += len(data)
        if client.transport is not None:
            client.transport.write(data)

    def eof_received(self) -> bool:
        client = self.client
        client.peer_eof = True
        transport = client.transport
        if client.client_eof or transport is None or not transport.can_write_eof():
            return False  # both directions are done: the transports close
        transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.peer_lost()

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()


class TcpProxy(asyncio.Protocol):
    """The client side: picks an instance of ``service``, connects, then relays."""

    def __init__(
        self,
        resolve: Callable[[], ServiceRuntime | None],
        metrics: MeshMetrics,
        source: str,
        connect_timeout: float = 5.0,
    ) -> None:
        self.resolve = resolve
        self.metrics = metrics
        self.source = source
        self.connect_timeout = connect_timeout
        self.transport: asyncio.Transport | None = None
        self.peer: _Peer | None = None
        self.pending: list[bytes] = []
        self.client_eof = False
        self.peer_eof = False
        self.sent = 0
        self.received = 0
        self.service: ServiceRuntime | None = None
        self.endpoint: Endpoint | None = None
        self.started = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.started = time.monotonic()
        self.service = self.resolve()
        if self.service is None:
            transport.close()
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        service = self.service
        assert service is not None and self.transport is not None
        cluster = service.cluster
        peername = self.transport.get_extra_info("peername")
        key = peername[0].encode() if peername and cluster.policy.consistent_hash else None
        avoid = None
        loop = asyncio.get_running_loop()
        for _ in range(CONNECT_ATTEMPTS):
            endpoint = cluster.pick(key=key, avoid=avoid)
            if endpoint is None or not cluster.begin(endpoint):
                break
            info = endpoint.info
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, peer = await loop.create_connection(
                        lambda: _Peer(self), info.address, info.port
                    )
            except (OSError, TimeoutError) as exc:
                log.info("tcp: cannot connect to %s:%s: %s", info.address, info.port, exc)
                cluster.end(endpoint, 503, time.monotonic() - self.started, error=True)
                avoid = endpoint
                continue
            if self.closed:
                cluster.end(endpoint, 200, 0.0)
                assert peer.transport is not None
                peer.transport.close()
                return
            self.endpoint = endpoint
            self.peer = peer
            self._series().opened += 1
            pending, self.pending = self.pending, []
            assert peer.transport is not None
            for data in pending:
                peer.transport.write(data)
            if self.client_eof and peer.transport.can_write_eof():
                peer.transport.write_eof()
            self.transport.resume_reading()
            return
        if self.transport is not None:
            self.transport.abort()

    def _series(self):  # type: ignore[no-untyped-def]
        name = self.service.name if self.service is not None else "unknown"
        return self.metrics.tcp(("source", self.source, name, name, name))

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # passed on once connected
        if self.peer_eof or not peer.transport.can_write_eof():
            return False
        peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def peer_lost(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()
        self._finish()

    def _finish(self) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is None or self.service is None:
            return
        self.service.cluster.end(endpoint, 200, time.monotonic() - self.started)
        series = self._series()
        series.closed += 1
        series.sent += self.sent
        series.received += self.received
