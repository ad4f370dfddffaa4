"""The integration admin listener: metrics, health, and routes listed, started, stopped, suspended.

Served by the project's engine (:class:`meshgate.proxy.Server`) on its own address
(``meshgate integration run --admin-listen``); it answers locally and never forwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from meshgate.integration._errors import EndpointError
from meshgate.integration._metrics import CONTENT_TYPE_LATEST
from meshgate.proxy import Exchange, Headers, Response, Server, ServerSettings, problem

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext
    from meshgate.integration._reload import RoutesReloader

__all__ = ["AdminListener"]

log = logging.getLogger("meshgate.integration")

_PATHS = (
    "admin paths: /metrics /healthz /reload /routes /routes/{id} /routes/{id}/{start|stop|suspend}"
)
_ACTIONS = ("start", "stop", "suspend")


def _json(status: int, doc: object) -> Response:
    return Response(status, json.dumps(doc).encode(), content_type="application/json")


def _not_allowed(method: str, allow: str) -> Response:
    response = problem(405, "Method Not Allowed", f"{method} is not served here")
    response.headers.set("allow", allow)
    return response


class _AdminHandler:
    def __init__(
        self, context: IntegrationContext, grace: float, reloader: RoutesReloader | None
    ) -> None:
        self.context = context
        self.grace = grace
        self.reloader = reloader

    def handle(self, exchange: Exchange) -> Response | Awaitable[Response]:
        request = exchange.request
        method, path = request.method, request.path
        reading = method in ("GET", "HEAD")
        if path in ("/metrics", "/healthz", "/routes") and not reading:
            return _not_allowed(method, "GET, HEAD")
        if method == "POST" and self.context.stopping:
            # Draining: a route started or a file reloaded now would outlive the stop.
            return problem(503, "Service Unavailable", "the runtime is stopping")
        if path == "/metrics":
            return Response(200, self.context.metrics.render(), content_type=CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return self._health()
        if path == "/routes":
            return _json(200, {"routes": [self._describe(r.id) for r in self.context.routes]})
        if path == "/reload":
            return self._reload(method)
        if not path.startswith("/routes/"):
            return problem(404, "Not Found", _PATHS)
        route_id, _, action = path[len("/routes/") :].partition("/")
        route_id = unquote(route_id)
        if route_id not in {r.id for r in self.context.routes}:
            return problem(404, "Not Found", f"no route {route_id!r}")
        if not action:
            return self._describe_one(route_id) if reading else _not_allowed(method, "GET, HEAD")
        if action not in _ACTIONS:
            return problem(404, "Not Found", _PATHS)
        if method != "POST":
            return _not_allowed(method, "POST")
        return self._act(route_id, action)

    def _reload(self, method: str) -> Response | Awaitable[Response]:
        """GET: the last reload of the routes file; POST: reload it now (as SIGHUP)."""
        reloader = self.reloader
        if reloader is None:
            return problem(404, "Not Found", "the routes file is not watched (--no-watch)")
        if method in ("GET", "HEAD"):
            return _json(200, reloader.describe())
        if method != "POST":
            return _not_allowed(method, "GET, HEAD, POST")
        return self._reload_now(reloader)

    async def _reload_now(self, reloader: RoutesReloader) -> Response:
        result = await reloader.reload()
        return _json(422 if result.refused else 200, reloader.describe())

    def _health(self) -> Response:
        statuses = [self.context.route_status(r.id) for r in self.context.routes]
        counts = {status: statuses.count(status) for status in sorted(set(statuses))}
        return _json(200, {"status": "ok", "routes": counts})

    def _describe(self, route_id: str) -> dict[str, Any]:
        context = self.context
        route = next(r for r in context.routes if r.id == route_id)
        doc: dict[str, Any] = {
            "id": route_id,
            "status": context.route_status(route_id),
            "from": route.from_uri,
            "stats": context.route_stats(route_id),
        }
        error = context.route_error(route_id)
        if error is not None:
            doc["error"] = error
        return doc

    def _describe_one(self, route_id: str) -> Response:
        return _json(200, self._describe(route_id))

    async def _act(self, route_id: str, action: str) -> Response:
        context = self.context
        if action == "start":
            try:
                await context.start_route(route_id)
            except Exception as exc:
                log.error("route %s failed to start: %s", route_id, exc)
                detail = f"route {route_id!r} failed to start: {exc}"
                return problem(500, "Internal Server Error", detail)
        elif action == "stop":
            await context.stop_route(route_id, self.grace)
        else:
            await context.suspend_route(route_id, self.grace)
        log.info("route %s: %s (admin)", route_id, context.route_status(route_id))
        return self._describe_one(route_id)

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


class AdminListener:
    """The admin HTTP API of one context, on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        context: IntegrationContext,
        listen: str,
        *,
        grace: float = 10.0,
        reloader: RoutesReloader | None = None,
    ) -> None:
        host, colon, port = listen.rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise EndpointError(f"admin listen address {listen!r}: write host:port")
        self.host, self.port = host.strip("[]"), int(port)
        self.handler = _AdminHandler(context, grace, reloader)
        self.server: Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        server = Server(self.handler, ServerSettings())
        try:
            await server.start(self.host, self.port)
        except OSError as exc:
            raise EndpointError(
                f"admin: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.server = server
        self.port = server.port

    async def stop(self, grace: float = 5.0) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.shutdown(grace)
