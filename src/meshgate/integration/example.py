"""The bundled example routes (``meshgate/examples/routes.yaml``), run beside the gateway.

:func:`start_example` starts them in the running event loop, so ``meshgate up`` serves
``POST /orders`` next to the gateway. Big orders go to the RabbitMQ queue ``big-orders``
when a broker answers; on a machine without one, the demo still starts: that one step
becomes a log endpoint, and :attr:`RunningExample.broker` says which it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from meshgate.config.tracing import with_flags
from meshgate.integration._admin import AdminListener
from meshgate.integration._context import IntegrationContext, RouteStartError
from meshgate.integration._errors import EndpointError
from meshgate.integration._model import Route
from meshgate.integration._yaml import load_routes
from meshgate.integration.components.amqp import DEFAULT_URL as DEFAULT_AMQP_URL
from meshgate.integration.testing import advise
from meshgate.telemetry.tracing import Tracing

__all__ = ["BROKER_STEP", "FALLBACK_STEP", "RunningExample", "example_path", "start_example"]

log = logging.getLogger("meshgate.integration.example")

#: The example's one broker step, and what stands for it when no broker answers.
BROKER_STEP = "amqp:queue:big-orders"
FALLBACK_STEP = "log:big-orders?show_headers=true"


def example_path() -> Path:
    """The bundled routes file; its schema (``schemas/order.json``) lies beside it."""
    return Path(str(resources.files("meshgate").joinpath("examples/routes.yaml")))


@dataclass
class RunningExample:
    """The example's routes, started: stop them with :meth:`stop`."""

    context: IntegrationContext
    #: Where the orders route is served, e.g. ``http://127.0.0.1:8088/orders``.
    url: str
    #: The broker big orders are published to (``host:port``), or ``None`` when they are
    #: logged instead because no broker answered.
    broker: str | None
    #: The routes' admin listener (``/metrics``, ``/healthz``, ``/routes``), when started.
    admin: AdminListener | None = None

    def usage(self) -> list[str]:
        """Lines that tell a user how to call the example."""
        body = '{"id": "o-1", "total": 250}'
        where = (
            f"the RabbitMQ queue big-orders on {self.broker}"
            if self.broker is not None
            else "the log (RabbitMQ is not available)"
        )
        lines = [f"  integration    POST {self.url}  (routes: {example_path()})"]
        if self.admin is not None:
            lines.append(f"  integration admin {self.admin.url}  (/metrics, /healthz, /routes)")
        return [
            *lines,
            f"  curl -s -H 'content-type: application/json' -d '{body}' {self.url}",
            f"  orders with total > 1000 go to {where}; the others are logged",
        ]

    async def stop(self, grace: float = 5.0) -> None:
        if self.admin is not None:
            await self.admin.stop(grace)
        await self.context.stop(grace)
        if self.context.tracing is not None:
            await asyncio.to_thread(self.context.tracing.shutdown)


async def start_example(
    http_listen: str = "127.0.0.1:8088",
    *,
    amqp_url: str | None = None,
    broker_timeout: float = 2.0,
    admin_listen: str | None = None,
    tracing: dict[str, object] | None = None,
) -> RunningExample:
    """Start the example routes in the running loop, serving ``http_listen``.

    The broker is ``amqp_url``, else ``MESHGATE_AMQP_URL``, else RabbitMQ on
    127.0.0.1:5672 (guest/guest). When it does not answer within ``broker_timeout``
    seconds, or refuses the connection, ``amqp:queue:big-orders`` is replaced by
    ``log:big-orders`` and the rest runs as written. Raises
    :class:`~meshgate.integration.RouteStartError` when the routes cannot start even so
    (``http_listen`` taken, say); nothing is left running then. With ``admin_listen``, the
    routes' admin listener serves there too (EndpointError when it cannot); ``tracing``
    (settings as flags give them) traces the routes.
    """
    path = example_path()
    loaded = load_routes(path)
    url = (
        amqp_url
        or os.environ.get("MESHGATE_AMQP_URL")
        or str(loaded.settings.get("amqp_url") or DEFAULT_AMQP_URL)
    )
    settings = {**loaded.settings, "http_listen": http_listen, "amqp_url": url}
    broker: str | None = _address(url)
    if not await _answers(url, broker_timeout):
        log.warning("no RabbitMQ answers at %s: big orders go to %s instead", broker, FALLBACK_STEP)
        broker = None
    tracer = (
        Tracing.start(with_flags(loaded.tracing, tracing), "meshgate-integration")
        if tracing
        else None
    )
    while True:
        routes = loaded.routes if broker is not None else _without_broker(loaded.routes)
        context = IntegrationContext(
            settings=settings, error_handler=loaded.error_handler, tracing=tracer
        )
        context.add_routes(routes)
        try:
            await context.start()
        except RouteStartError as exc:
            await context.stop(0)
            # An EndpointError is ours (the address is taken): no broker would help.
            if broker is None or all(isinstance(e, EndpointError) for e in exc.failures.values()):
                raise
            log.warning("big orders go to %s instead: %s", FALLBACK_STEP, exc)
            broker = None
            continue
        running = RunningExample(context, f"http://{http_listen}/orders", broker)
        if admin_listen:
            admin = AdminListener(context, admin_listen)
            try:
                await admin.start()
            except EndpointError:
                await context.stop(0)
                raise
            running.admin = admin
        return running


def _without_broker(routes: list[Route]) -> list[Route]:
    return [advise(route, replace_to={BROKER_STEP: FALLBACK_STEP}) for route in routes]


def _address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"


async def _answers(url: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at the broker's address."""
    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 5672), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
