"""The HTTP proxy engine: knows HTTP/1.1, HTTP/2 and TLS, nothing about products or services."""

from typing import TYPE_CHECKING, Any

from meshgate.proxy._exchange import (
    ClientDisconnected,
    Exchange,
    Handler,
    Headers,
    Request,
    RequestBodyError,
    Response,
    problem,
)
from meshgate.proxy._path import BadTarget, split_target
from meshgate.proxy._server import Server, ServerSettings, bind_socket
from meshgate.proxy._tls import (
    ALPN,
    CertificateFiles,
    PeerCertificate,
    ServerTls,
    TlsError,
    TlsInfo,
    client_context,
    subject_key,
)
from meshgate.proxy._upstream import UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from meshgate.proxy._upstream_h2 import H2UpstreamPool


def __getattr__(name: str) -> Any:
    # HTTP/2 upstreams load h2 when first used (see _server._serve_h2).
    if name == "H2UpstreamPool":
        from meshgate.proxy._upstream_h2 import H2UpstreamPool

        return H2UpstreamPool
    raise AttributeError(f"module 'meshgate.proxy' has no attribute {name!r}")


__all__ = [
    "ALPN",
    "BadTarget",
    "CertificateFiles",
    "ClientDisconnected",
    "Exchange",
    "H2UpstreamPool",
    "Handler",
    "Headers",
    "PeerCertificate",
    "Request",
    "RequestBodyError",
    "Response",
    "Server",
    "ServerSettings",
    "ServerTls",
    "TlsError",
    "TlsInfo",
    "UpstreamError",
    "UpstreamPool",
    "bind_socket",
    "client_context",
    "subject_key",
    "problem",
    "split_target",
]
