"""Traffic mirroring: a copy of a request, sent on its own and never waited for.

The caller's response never depends on the mirror: the copy goes out on a task of its own,
on a connection of its own, and its answer is read and dropped. Copies in flight are
bounded; beyond the bound a copy is skipped (and counted) rather than queued.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

__all__ = ["MIRROR_TIMEOUT", "MAX_IN_FLIGHT", "send_copy", "skipped"]

log = logging.getLogger("meshgate.mesh.mirror")

MIRROR_TIMEOUT = 10.0
MAX_IN_FLIGHT = 256

_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
    }
)
_tasks: set[asyncio.Task[None]] = set()
skipped = [0]


def send_copy(
    address: str,
    port: int,
    method: str,
    target: str,
    host: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    tls: ssl.SSLContext | None = None,
    verify: Callable[[asyncio.BaseTransport], None] | None = None,
) -> None:
    """Send a copy of a request to ``address:port`` in the background; with ``tls``, over
    TLS, sent only once ``verify`` (given the transport) has not raised."""
    if len(_tasks) >= MAX_IN_FLIGHT:
        skipped[0] += 1
        return
    parts = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n".encode("latin-1")]
    for name, value in headers:
        if name not in _HOP:
            parts += (name, b": ", value, b"\r\n")
    if body or method in ("POST", "PUT", "PATCH"):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"connection: close\r\n\r\n")
    parts.append(body)
    task = asyncio.get_running_loop().create_task(
        _send(address, port, b"".join(parts), tls, verify)
    )
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _send(
    address: str,
    port: int,
    data: bytes,
    tls: ssl.SSLContext | None,
    verify: Callable[[asyncio.BaseTransport], None] | None,
) -> None:
    writer = None
    try:
        async with asyncio.timeout(MIRROR_TIMEOUT):
            reader, writer = await asyncio.open_connection(address, port, ssl=tls)
            if verify is not None:
                verify(writer.transport)
            writer.write(data)
            await writer.drain()
            while await reader.read(65536):
                pass
    except Exception as exc:  # OSError, a timeout, a peer that is not the service's
        log.debug("mirror copy to %s:%s failed: %s", address, port, exc)
    finally:
        if writer is not None:
            writer.close()
