"""The HTTP/1.1 proxy engine: knows HTTP, nothing about products or services."""

from meshgate.proxy._exchange import Exchange, Handler, Headers, Request, Response, problem

__all__ = ["Exchange", "Handler", "Headers", "Request", "Response", "problem"]
