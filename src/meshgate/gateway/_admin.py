"""The admin listener: /metrics, /healthz, /readyz, /usage/{application}, /config."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import unquote

from meshgate.limits import BackendUnavailable
from meshgate.proxy import Exchange, Headers, Response, problem
from meshgate.telemetry.metrics import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from meshgate.gateway._runner import GatewayProcess


def _json(status: int, doc: object) -> Response:
    return Response(status, json.dumps(doc).encode(), content_type="application/json")


class AdminHandler:
    """Answers locally; never forwards. Reads the process's current gateway."""

    def __init__(self, process: GatewayProcess) -> None:
        self.process = process

    async def handle(self, exchange: Exchange) -> Response | None:
        request = exchange.request
        path = request.path
        if request.method not in ("GET", "HEAD"):
            response = problem(405, "Method Not Allowed", "the admin listener is read-only")
            response.headers.set("allow", "GET, HEAD")
            return response
        gateway = self.process.gateway
        if path == "/metrics":
            return Response(200, gateway.metrics.render(), content_type=CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        process = self.process
        sync = process.control_plane
        if path == "/readyz":
            if not process.ready:
                doc: dict[str, object] = {
                    "status": "unavailable",
                    "reason": "no configuration snapshot applied yet",
                }
                if sync is not None:
                    doc["last_error"] = process.last_error
                    doc["control_plane"] = sync.describe()
                return _json(503, doc)
            try:
                await gateway.counters.ping()
            except BackendUnavailable as exc:
                if gateway.deny_on_backend_error:
                    return _json(503, {"status": "unavailable", "reason": str(exc)})
            ready: dict[str, object] = {
                "status": "ready",
                "config_version": process.version,
                "source": process.source,
            }
            if sync is not None:
                ready["last_error"] = process.last_error
                ready["last_contact"] = sync.last_contact
            return _json(200, ready)
        if path == "/config":
            config: dict[str, object] = {
                "version": process.version or None,
                "source": process.source,
                "loaded_at": process.loaded_at,
                "last_error": process.last_error,
                "products": [p.name for p in gateway.products],
            }
            if sync is not None:
                config["control_plane"] = sync.describe()
            if process.identity_client is not None:
                config["identity"] = process.identity_client.describe()
            return _json(200, config)
        if path.startswith("/usage/"):
            application = unquote(path[len("/usage/") :])
            try:
                products = await gateway.usage(application)
            except BackendUnavailable as exc:
                return problem(503, "Service Unavailable", f"usage cannot be read: {exc}")
            if not products:
                return problem(404, "Not Found", f"no application {application!r}")
            return _json(200, {"application": application, "products": products})
        return problem(
            404, "Not Found", "admin paths: /metrics /healthz /readyz /config /usage/{app}"
        )

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass
