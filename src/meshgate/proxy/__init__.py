"""The HTTP/1.1 proxy engine: knows HTTP, nothing about products or services."""

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
from meshgate.proxy._upstream import UpstreamError, UpstreamPool

__all__ = [
    "BadTarget",
    "ClientDisconnected",
    "Exchange",
    "Handler",
    "Headers",
    "Request",
    "RequestBodyError",
    "Response",
    "Server",
    "ServerSettings",
    "UpstreamError",
    "UpstreamPool",
    "bind_socket",
    "problem",
    "split_target",
]
