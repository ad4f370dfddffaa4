"""Helpers of the integration runtime tests: run routes in a fresh context."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from meshgate.integration import IntegrationContext, Route


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def run_routes(
    routes: list[Route], scenario: Callable[[IntegrationContext], Awaitable[None]], **kwargs: object
) -> None:
    """Start ``routes`` in a fresh context, run ``scenario``, stop the context."""

    async def main() -> None:
        context = IntegrationContext(**kwargs)  # type: ignore[arg-type]
        context.add_routes(routes)
        await context.start()
        try:
            await scenario(context)
        finally:
            await context.stop(grace=2.0)

    run(main)
