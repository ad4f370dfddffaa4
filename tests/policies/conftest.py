"""Build requests and exchanges directly: the policies are pure, no sockets needed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from meshgate.policies import PolicyChain
from meshgate.proxy import Exchange, Headers, Request, Response


class MakeExchange(Protocol):
    def __call__(
        self,
        method: str = "GET",
        path: str = "/",
        headers: list[tuple[str, str]] | None = None,
        client_ip: str = "203.0.113.7",
        content_length: int | None = None,
        chunked: bool = False,
        request_id: str = "req-1",
        query: str = "",
    ) -> Exchange: ...


@pytest.fixture
def make_exchange() -> MakeExchange:
    def make(
        method: str = "GET",
        path: str = "/",
        headers: list[tuple[str, str]] | None = None,
        client_ip: str = "203.0.113.7",
        content_length: int | None = None,
        chunked: bool = False,
        request_id: str = "req-1",
        query: str = "",
    ) -> Exchange:
        fields = Headers()
        for name, value in headers or []:
            fields.add(name, value)
        target = (path + ("?" + query if query else "")).encode("latin-1")
        request = Request(
            method,
            target,
            path,
            query,
            fields,
            client_ip=client_ip,
            host="api.example.com",
            content_length=content_length,
            chunked=chunked,
            request_id=request_id,
        )
        return Exchange(request, start=0.0)

    return make


@pytest.fixture
def chain() -> Callable[..., PolicyChain]:
    """``chain(name, **config)``: a one-policy chain."""

    def build(name: str, **config: Any) -> PolicyChain:
        return PolicyChain.build([{name: config}])

    return build


@pytest.fixture
def read_problem() -> Callable[[Response], dict[str, Any]]:
    """The problem+json document of a local answer (asserting the content type)."""

    def read(response: Response) -> dict[str, Any]:
        assert response.headers.get("content-type") == "application/problem+json"
        doc: dict[str, Any] = json.loads(response.body)
        assert doc["status"] == response.status
        return doc

    return read
