"""Refuse request bodies over a size (Kong ``request-size-limiting``).

A ``Content-Length`` over ``max_bytes`` gets 413 in the rewrite phase, before
authentication and before any body byte is read. Otherwise the limit is handed to the
engine (``exchange.max_body_size``, the smaller of this and any limit already set),
which enforces it while streaming a chunked body.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.proxy import Exchange, Response, problem

__all__ = ["RequestSizeLimitConfig", "RequestSizeLimitPolicy"]


class RequestSizeLimitConfig(PolicyConfig):
    max_bytes: int = Field(ge=0, description="Largest request body in bytes; 0 allows none.")


class RequestSizeLimitPolicy(Policy):
    """413 for a declared body over ``max_bytes``; the engine enforces it on chunked ones."""

    name: ClassVar[str] = "request_size_limit"
    Config: ClassVar[type[PolicyConfig]] = RequestSizeLimitConfig

    def __init__(self, config: RequestSizeLimitConfig) -> None:
        super().__init__(config)
        self._max = config.max_bytes

    def rewrite(self, exchange: Exchange) -> Response | None:
        length = exchange.request.content_length
        if length is not None and length > self._max:
            return problem(
                413,
                "Content Too Large",
                f"the request body is {length} bytes; the limit is {self._max}",
                max_bytes=self._max,
            )
        current = exchange.max_body_size
        exchange.max_body_size = self._max if current is None else min(current, self._max)
        return None
