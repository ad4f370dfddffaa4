"""The HTTP/2 pool that speaks mutual TLS (ALPN h2) to instances whose sidecar does.

Apart from ``_mtls`` because it loads h2: imported only by a sidecar calling an ``http2``
service.
"""

from __future__ import annotations

from typing import Any

from meshgate.mesh._mtls import PeerCheck, PeerMismatch
from meshgate.proxy import UpstreamError
from meshgate.proxy._upstream_h2 import H2UpstreamConnection, H2UpstreamPool

__all__ = ["MtlsH2Pool"]


class MtlsH2Pool(H2UpstreamPool):
    """One multiplexed connection to an instance: h2 over mutual TLS when it speaks it
    (checked as :class:`~meshgate.mesh._mtls.MtlsPool` checks), h2c otherwise."""

    __slots__ = ("peer",)

    def __init__(self, *args: Any, peer: PeerCheck, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peer = peer

    async def _open(self) -> H2UpstreamConnection:
        peer = self.peer
        self.tls = tls = peer.context()
        self.scheme = b"https" if tls is not None else b"http"
        try:
            conn = await super()._open()
        except UpstreamError as exc:
            if tls is not None:
                peer.failed(exc)
            raise
        if tls is not None:
            try:
                peer.verify(conn.transport)
            except PeerMismatch:
                conn.close()
                raise
        return conn
