"""The policy protocol: small objects with optional phase methods, chained per product.

A policy module defines one subclass of :class:`Policy` with a pydantic ``Config`` (its
schema, beside its handler) and overrides only the phases it needs. Phases never do
blocking I/O. A phase that returns a :class:`~meshgate.proxy.Response` answers the
request locally and ends the chain.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from meshgate.proxy import Exchange, Headers, Response


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy:
    name: ClassVar[str]
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def rewrite(self, exchange: Exchange) -> Response | None:
        """Before authentication: rewrite the path or headers, answer preflights, filter."""
        return None

    def access(self, exchange: Exchange) -> Response | None:
        """After the credential was checked and usage counted, before forwarding."""
        return None

    def response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        """Change the response head (upstream's or local) before it is sent."""

    def log(self, exchange: Exchange) -> None:
        """After the last byte was sent; must not raise."""
