"""The HTTP proxy engine: knows HTTP/1.1, HTTP/2 and TLS, nothing about products or services."""

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
from meshgate.proxy._upstream_h2 import H2UpstreamPool

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
