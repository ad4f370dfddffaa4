"""A testing kit for routes, after Camel's mock endpoints and advice.

    route = advise(route, replace_from="direct:start", mock_endpoints=["amqp:*"])
    async with IntegrationContext() as context:   # after context.add_route(route)
        result = mock_endpoint(context, "mock:amqp:queue:big-orders").expect_count(1)
        await context.send("direct:start", {"total": 5000})
        await result.assert_satisfied()

``mock_endpoints`` replaces every static ``to`` (and wire tap, enrich, dead letter) whose
URI matches one of the glob patterns by ``mock:<uri without options>``, which is not called.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from meshgate.integration import _model as m
from meshgate.integration._context import IntegrationContext
from meshgate.integration.components.mock import MockEndpoint

__all__ = ["MockEndpoint", "advise", "mock_endpoint", "mocked_uri"]


def mocked_uri(uri: str) -> str:
    """The mock that stands for ``uri``: ``amqp:queue:x?durable=true`` -> ``mock:amqp:queue:x``."""
    return "mock:" + uri.partition("?")[0]


def mock_endpoint(context: IntegrationContext, uri: str) -> MockEndpoint:
    """The mock endpoint of ``uri`` (``mock:...``), for expectations and received messages."""
    endpoint = context.endpoint(uri)
    if not isinstance(endpoint, MockEndpoint):
        raise TypeError(f"{uri} is not a mock endpoint")
    return endpoint


def advise(
    route: m.Route,
    *,
    replace_from: str | None = None,
    replace_to: Mapping[str, str] | None = None,
    mock_endpoints: Iterable[str] = (),
) -> m.Route:
    """A copy of ``route`` with its ``from`` replaced and chosen endpoints intercepted."""
    patterns = list(mock_endpoints)
    replacements = dict(replace_to or {})

    def swap(uri: str) -> str:
        if uri in replacements:
            return replacements[uri]
        if any(fnmatch.fnmatchcase(uri, pattern) for pattern in patterns):
            return mocked_uri(uri)
        return uri

    handler = route.error_handler
    if handler is not None and handler.dead_letter is not None:
        handler = dataclasses.replace(handler, dead_letter=swap(handler.dead_letter))
    return dataclasses.replace(
        route,
        from_uri=replace_from or route.from_uri,
        steps=_swap_steps(route.steps, swap),
        error_handler=handler,
    )


def _swap_steps(steps: tuple[m.Step, ...], swap: Any) -> tuple[m.Step, ...]:
    return tuple(_swap_step(step, swap) for step in steps)


def _swap_step(step: Any, swap: Any) -> Any:
    if isinstance(step, m.To | m.WireTap | m.Enrich):
        return dataclasses.replace(step, uri=swap(step.uri))
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(step):
        value = getattr(step, field.name)
        if field.name in ("steps", "branches", "otherwise", "fallback") and value is not None:
            changes[field.name] = _swap_steps(value, swap)
        elif field.name == "when":
            changes["when"] = tuple(
                dataclasses.replace(when, steps=_swap_steps(when.steps, swap)) for when in value
            )
    return dataclasses.replace(step, **changes) if changes else step
