"""The gateway's calls into the mesh: mutual TLS with its workload identity.

A product whose ``upstream_tls`` names a ``mesh_service`` reaches that service's sidecars
(their inbound port, an ``https://`` backend): each new connection presents the gateway's
certificate (the context of its current identity, so a renewal applies to the next
connection) and checks that the server is the service's workload,
``spiffe://<the gateway's trust domain>/ns/<its environment>/sa/<mesh_service>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshgate.proxy import UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from meshgate.identity import Identity
    from meshgate.proxy._upstream import UpstreamConnection

__all__ = ["MeshUpstreamPool", "PeerMismatch"]


class PeerMismatch(UpstreamError):
    """The sidecar answered with another workload's certificate, or the gateway has no
    identity to call the mesh with: 503, nothing was sent."""

    status = 503


class MeshUpstreamPool(UpstreamPool):
    """HTTP/1.1 connections to a mesh service's sidecar, mutual TLS, the server checked."""

    __slots__ = ("service", "identity")

    def __init__(
        self, *args: Any, service: str, identity: Callable[[], Identity | None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.service = service
        self.identity = identity

    async def connect(self) -> UpstreamConnection:
        identity = self.identity()
        if identity is None:
            raise PeerMismatch(
                f"the gateway has no workload identity to call mesh service {self.service!r} "
                "with (give it identity files, or a bootstrap token)"
            )
        self.tls = identity.client_context()
        conn = await super().connect()
        from meshgate.config.identity import SpiffeId
        from meshgate.identity import peer_id

        own = identity.spiffe_id
        expected = SpiffeId(own.trust_domain, own.env, self.service)
        transport = conn.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        peer = peer_id(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
        if peer != expected:
            conn.abort()
            got = peer.uri if peer is not None else "no SPIFFE ID"
            raise PeerMismatch(
                f"the TLS peer {self.host}:{self.port} is {got}, not {expected.uri} "
                f"(mesh service {self.service!r})"
            )
        return conn
