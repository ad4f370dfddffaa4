"""The control plane's ASGI application: admin API under /admin/api, data-plane API under
/dp/v1, health at /healthz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshgate.config.usage import MAX_BATCH_BYTES
from meshgate.control import _problems
from meshgate.control._applications import router as applications
from meshgate.control._auth import AuthenticationGate
from meshgate.control._ca_api import MAX_IDENTITY_BODY
from meshgate.control._ca_api import admin as ca_admin
from meshgate.control._ca_api import dataplane as identity_dataplane
from meshgate.control._declarative_api import router as declarative
from meshgate.control._environments import admin as environments
from meshgate.control._environments import dataplane
from meshgate.control._mesh_api import admin as mesh
from meshgate.control._mesh_api import dataplane as mesh_dataplane
from meshgate.control._metrics import RequestMetrics
from meshgate.control._plane import ControlPlane, ControlSettings
from meshgate.control._resources import router as resources

__all__ = ["MAX_BODY", "create_app"]

# A declarative file of 50,000 applications is a few MiB; an OpenAPI document less.
MAX_BODY = 64 * 1024 * 1024
# A sidecar's registration or heartbeat is a few hundred bytes.
MAX_MESH_DATAPLANE_BODY = 64 * 1024


DOCS_ASSETS = "/admin/api/docs/assets"


def _docs(app: FastAPI) -> None:
    """``/admin/api/docs``: Swagger UI from the fastapi-offline package's files, served here."""
    from importlib import resources

    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from starlette.staticfiles import StaticFiles

    assets = str(resources.files("fastapi_offline").joinpath("static"))
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/admin/api/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/admin/api/openapi.json",
            title="meshgate control plane",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url="/admin/api/docs/oauth2-redirect",
        )

    @app.get("/admin/api/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> Response:
        return get_swagger_ui_oauth2_redirect_html()


class _BodyLimit:
    """Refuse request bodies above a size with 413, counted as they arrive; ``smaller``
    holds lower limits for paths under a prefix."""

    def __init__(self, app: ASGIApp, limit: int, smaller: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = limit
        self.smaller = smaller or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = next(
            (size for prefix, size in self.smaller.items() if path.startswith(prefix)),
            self.default,
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _problems.problem_response(
                        413, f"the request body exceeds {limit} bytes"
                    )(scope, receive, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException: FastAPI's body reader lets it through (any other
                    # exception there becomes a 400), and the problem handlers answer it.
                    raise HTTPException(413, f"the request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(settings: ControlSettings, plane: ControlPlane | None = None) -> FastAPI:
    """The application; the store is migrated and snapshots published before it serves."""
    # Analytics, alerts and billing build on control.models: imported here, once the control
    # package is whole (meshgate.control imports this module).
    from meshgate.analytics import alerts, alerts_api, graph_api
    from meshgate.analytics import api as analytics
    from meshgate.analytics.retention import Retention
    from meshgate.billing import schedule as billing_schedule
    from meshgate.billing.api import router as billing

    plane = plane or ControlPlane(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await plane.start()
        billing_schedule.start(plane)
        try:
            yield
        finally:
            await billing_schedule.stop()
            await plane.stop()

    app = FastAPI(
        title="meshgate control plane",
        version="1",
        description="Manage API products, plans, applications and keys, and the mesh's "
        "services; gateways pull the compiled configuration from /dp/v1, sidecars the mesh's "
        "from /dp/v1/mesh, where they also register and stream the endpoints.",
        openapi_url="/admin/api/openapi.json",
        # Served below from the package's own copy of Swagger UI: no CDN, works offline.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.plane = plane
    _problems.install(app)
    app.openapi = lambda: _problems.document_problems(app)  # type: ignore[method-assign]
    for router in (resources, applications, environments, mesh, ca_admin, analytics.admin, billing):
        app.include_router(router, prefix="/admin/api")
    app.include_router(declarative, prefix="/admin/api")
    app.include_router(alerts_api.router, prefix="/admin/api")
    app.include_router(graph_api.admin, prefix="/admin/api")
    app.include_router(dataplane)
    app.include_router(mesh_dataplane)
    app.include_router(identity_dataplane)
    app.include_router(analytics.dataplane)
    app.include_router(graph_api.dataplane)
    plane.services.append(Retention())
    app.state.alerts = alerts.AlertService(
        plane.db, settings.alerts or alerts.AlertSettings.from_env()
    )
    plane.services.append(app.state.alerts)

    _docs(app)

    @app.get("/healthz", tags=["health"], operation_id="health")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", **plane.status()}

    @app.get(
        "/metrics",
        tags=["health"],
        operation_id="metrics",
        summary="The control plane's own metrics, in the Prometheus text format",
        response_class=Response,
    )
    def metrics() -> Response:
        return Response(plane.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Outermost first: a request without a valid token is refused before its size is.
    app.add_middleware(
        _BodyLimit,
        limit=MAX_BODY,
        smaller={
            # The first prefix that matches sets the limit.
            "/dp/v1/mesh/edges": graph_api.MAX_REPORT_BYTES,
            "/dp/v1/mesh/": MAX_MESH_DATAPLANE_BODY,
            "/dp/v1/identity/": MAX_IDENTITY_BODY,
            "/dp/v1/usage": MAX_BATCH_BYTES,
            "/admin/api/webhooks": alerts_api.MAX_WEBHOOK_BODY,
        },
    )
    app.add_middleware(AuthenticationGate)
    # Outermost: refusals are counted too.
    app.add_middleware(RequestMetrics, metrics=plane.metrics, schema=lambda: app.openapi())
    return app
