"""The mesh's admin API (services staged and promoted like products, their snapshots, the live
registry) and its data-plane API for sidecars: the configuration long poll, registrations and
heartbeats, and the endpoint stream (server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from meshgate.config.loader import MAX_BYTES
from meshgate.config.mesh import SERVICE_NAME, Service
from meshgate.control import _mesh
from meshgate.control import schemas as s
from meshgate.control._auth import Actor, DataplaneActor, Reader, Writer
from meshgate.control._crud import audit
from meshgate.control._environments import long_poll
from meshgate.control._plane import mesh_channel
from meshgate.control._problems import Problem
from meshgate.control.models import MeshService, MeshSnapshot

__all__ = ["EventStream", "admin", "dataplane"]

admin = APIRouter(prefix="/mesh", tags=["mesh"])
dataplane = APIRouter(prefix="/dp/v1/mesh", tags=["mesh data plane"])

NamePath = Annotated[
    str, Path(pattern=SERVICE_NAME, max_length=253, description="The service's name.")
]
IdPath = Annotated[str, Path(pattern=s.INSTANCE_ID, description="The registration's id.")]

_SERVICE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The service (meshgate.config.mesh.Service), named as in the path.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Service"}}},
    }
}


async def _json_body(request: Request) -> Any:
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if not (
        kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
    ):
        raise Problem(
            415,
            "send the body as application/json",
            errors=[{"field": "header.content-type", "message": "must be application/json"}],
        )
    raw = await request.body()
    if len(raw) > MAX_BYTES:
        raise Problem(413, f"the body exceeds {MAX_BYTES} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Problem(400, f"the body is not JSON: {exc}", field="body") from None


# Services


@admin.get(
    "/services",
    response_model=s.Page[Service],
    response_model_exclude_unset=True,
    operation_id="list_mesh_services",
    summary="The environment's mesh services (staging unless env says otherwise)",
)
def list_services(
    request: Request,
    _actor: Reader,
    env: s.Env = Query("staging"),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with request.app.state.plane.db.session() as session:
        total = session.scalar(
            select(func.count()).select_from(MeshService).where(MeshService.env == env)
        )
        documents = session.scalars(
            select(MeshService.document)
            .where(MeshService.env == env)
            .order_by(MeshService.name)
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
    items = [Service.model_validate(d) for d in documents]
    return {"items": items, "page": page, "per_page": per_page, "total": total or 0}


@admin.get(
    "/services/{name}",
    response_model=Service,
    response_model_exclude_unset=True,
    operation_id="read_mesh_service",
    responses={404: {"description": "No such service in the environment"}},
)
def read_service(
    request: Request, _actor: Reader, name: NamePath, env: s.Env = Query("staging")
) -> Any:
    with request.app.state.plane.db.session() as session:
        row = session.get(MeshService, (env, name))
        if row is None:
            raise Problem(404, f"{env} has no mesh service {name!r}")
        return Service.model_validate(row.document)


def _put(session: Session, actor: Actor, name: str, body: Any) -> tuple[Service, bool, Any]:
    if not isinstance(body, dict):
        raise Problem(422, "the body must be an object: the service", field="body")
    if body.get("name") != name:
        raise Problem(
            422,
            f"must be the path's name {name!r} (to rename, PUT the new name and DELETE the old)",
            field="body.name",
        )
    document = body
    errors = _mesh.storable_errors(document, "body")
    if errors:
        raise Problem(422, f"{errors[0]['field']}: {errors[0]['message']}", errors=errors)
    _mesh.lock(session)
    current = _mesh.documents(session, "staging")
    before = current.get(name)
    wanted = dict(sorted({**current, name: document}.items()))
    service = _mesh.validated(wanted, {name: "body"}, top="body").service(name)
    assert service is not None
    wanted[name] = service.model_dump(mode="json", exclude_unset=True)
    _mesh.write(session, "staging", wanted)
    if before != wanted[name]:
        action = "create" if before is None else "update"
        audit(session, actor, action, "mesh_service", name, before, wanted[name])
    return service, before is None, _mesh.publish(session, "staging", f"mesh service {name}")


@admin.put(
    "/services/{name}",
    response_model=Service,
    response_model_exclude_unset=True,
    operation_id="put_mesh_service",
    summary="Create or replace a service in staging; the whole mesh configuration must stay "
    "valid (a refused change stores nothing)",
    responses={201: {"model": Service, "description": "The service was created."}},
    openapi_extra=_SERVICE_BODY,
)
async def put_service(request: Request, response: Response, actor: Writer, name: NamePath) -> Any:
    body = await _json_body(request)
    plane = request.app.state.plane

    def run() -> tuple[Service, bool]:
        with plane.db.writer() as session, session.begin():
            service, created, snapshot = _put(session, actor, name, body)
        plane.mesh_published(snapshot)
        return service, created

    service, created = await run_in_threadpool(run)
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/admin/api/mesh/services/{name}"
    return service


@admin.delete(
    "/services/{name}",
    status_code=204,
    operation_id="delete_mesh_service",
    summary="Remove a service from staging; refused (409) while another service routes to it",
)
def delete_service(request: Request, actor: Writer, name: NamePath) -> Response:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        _mesh.lock(session)
        current = _mesh.documents(session, "staging")
        if name not in current:
            raise Problem(404, f"staging has no mesh service {name!r}")
        wanted = {k: v for k, v in current.items() if k != name}
        _mesh.validated(wanted, {}, status=409, intro=f"other services refer to {name!r}: ")
        _mesh.write(session, "staging", wanted)
        audit(session, actor, "delete", "mesh_service", name, current[name], None)
        snapshot = _mesh.publish(session, "staging", f"mesh service {name} removed")
    plane.mesh_published(snapshot)
    return Response(status_code=204)


@admin.post(
    "/promote",
    response_model=s.Published,
    operation_id="promote_mesh",
    summary="Copy staging's mesh configuration to production: a new production version",
)
def promote(request: Request, actor: Writer) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        before, snapshot = _mesh.promote(session)
        if snapshot is not None:
            audit(
                session,
                actor,
                "promote",
                "mesh",
                "production",
                {"version": before},
                {"version": snapshot.version},
            )
    plane.mesh_published(snapshot)
    version = snapshot.version if snapshot is not None else before
    return s.Published(env="production", version=version, changed=snapshot is not None, errors=[])


# Snapshots


@admin.get(
    "/snapshots",
    response_model=s.Page[s.SnapshotOut],
    operation_id="list_mesh_snapshots",
    summary="The environment's mesh configuration versions, newest first",
)
def list_snapshots(
    request: Request,
    _actor: Reader,
    env: s.Env = Query("production"),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with request.app.state.plane.db.session() as session:
        total = session.scalar(
            select(func.count()).select_from(MeshSnapshot).where(MeshSnapshot.env == env)
        )
        rows = session.scalars(
            select(MeshSnapshot)
            .where(MeshSnapshot.env == env)
            .order_by(MeshSnapshot.version.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
        items = [s.SnapshotOut.model_validate(r) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total or 0}


@admin.get(
    "/snapshots/{version}",
    operation_id="read_mesh_snapshot",
    summary="The mesh configuration document of one version",
    responses={200: {"content": {"application/json": {}}}},
)
def read_snapshot(
    request: Request,
    _actor: Reader,
    version: int = Path(ge=1, le=s.MAX_ID),
    env: s.Env = Query("production"),
) -> Response:
    with request.app.state.plane.db.session() as session:
        row = session.scalars(
            select(MeshSnapshot).where(MeshSnapshot.env == env, MeshSnapshot.version == version)
        ).first()
        if row is None:
            raise Problem(404, f"{env} has no mesh version {version}")
        return Response(row.document, media_type="application/json")


# The live registry


@admin.get(
    "/instances",
    response_model=s.Page[s.MeshInstanceOut],
    operation_id="list_mesh_instances",
    summary="The registry as it is now: registered and static instances, ready or not",
)
async def list_instances(
    request: Request,
    _actor: Reader,
    env: s.Env = Query("production"),
    service: str | None = Query(None, pattern=SERVICE_NAME, max_length=253),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(500, ge=1, le=5000),
) -> Any:
    items = request.app.state.plane.registry.instances(env, service)
    chosen = items[(page - 1) * per_page : page * per_page]
    return {"items": chosen, "page": page, "per_page": per_page, "total": len(items)}


# The data-plane API


@dataplane.get(
    "/config",
    operation_id="pull_mesh_config",
    summary="The environment's mesh configuration (MeshConfig); 304 when If-None-Match still "
    "holds after waiting up to `wait` seconds for a new version",
    responses={200: {"content": {"application/json": {}}}, 304: {}},
)
async def pull_config(
    request: Request,
    _actor: DataplaneActor,
    env: s.Env = Query("production"),
    wait: float = Query(0, ge=0, le=60),
    if_none_match: str | None = Header(None, max_length=200),
) -> Response:
    plane = request.app.state.plane
    return await long_poll(
        plane,
        mesh_channel(env),
        lambda: plane.latest_mesh(env),
        wait,
        if_none_match,
        f"{env} has no mesh configuration yet",
    )


@dataplane.post(
    "/instances",
    status_code=201,
    response_model=s.Registered,
    operation_id="register_mesh_instance",
    summary="Register an instance of a service; the same address and port registered again "
    "replaces the earlier registration (a new id)",
    responses={409: {}, 429: {"description": "The registry or this token is at its limit."}},
)
async def register(request: Request, actor: DataplaneActor, body: s.InstanceRegistration) -> Any:
    registry = request.app.state.plane.registry
    instance_id = registry.register(actor.name, body.env, body.service, body, body.ready)
    return s.Registered(id=instance_id, ttl=registry.settings.ttl)


@dataplane.put(
    "/instances/{instance_id}",
    response_model=s.HeartbeatOut,
    operation_id="heartbeat_mesh_instance",
    summary="A heartbeat: the registration lives another ttl; 404 when it is gone (register again)",
    responses={403: {}, 404: {}},
)
async def heartbeat(
    request: Request, actor: DataplaneActor, instance_id: IdPath, body: s.Heartbeat
) -> Any:
    registry = request.app.state.plane.registry
    registry.heartbeat(actor.name, instance_id, body.ready)
    return s.HeartbeatOut(ttl=registry.settings.ttl)


@dataplane.delete(
    "/instances/{instance_id}",
    status_code=204,
    operation_id="deregister_mesh_instance",
    summary="Remove a registration at once (a draining sidecar)",
    responses={403: {}, 404: {}},
)
async def deregister(request: Request, actor: DataplaneActor, instance_id: IdPath) -> Response:
    request.app.state.plane.registry.deregister(actor.name, instance_id)
    return Response(status_code=204)


class EventStream(StreamingResponse):
    """``text/event-stream`` that ends as soon as the client's connection closes: the
    disconnect is read as it happens, not found later by a failed write; ``closed`` runs
    then."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], closed: Callable[[], None]) -> None:
        super().__init__(
            events,
            media_type=self.media_type,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._closed = closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            # A write to a closed connection fails: the stream has ended either way.
            await asyncio.gather(*tasks, return_exceptions=True)
            self._closed()


@dataplane.get(
    "/endpoints",
    operation_id="stream_mesh_endpoints",
    summary="Server-sent events: a snapshot of every service's ready instances, then an "
    "update with the complete new list of each service that changed, as it changes",
    description="Events: `snapshot` and `update`, each with `id: VERSION` and data "
    '`{"version": N, "services": {"NAME": [{"id", "address", "port", "version", "zone", '
    '"labels", "weight"}]}}`; a `: ping` comment every 5 s when idle. With Last-Event-ID, '
    "only what changed since that version (a snapshot when it is no longer known). With "
    "`instance=ID`, the registration lives only while this stream (or another for it) is "
    "open: a second after its connection closes, it leaves.",
    response_class=EventStream,
    status_code=200,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        403: {},
        404: {},
        429: {"description": "The control plane or this token is at its limit of streams."},
    },
)
async def endpoints(
    request: Request,
    actor: DataplaneActor,
    env: s.Env = Query("production"),
    instance: str | None = Query(
        None,
        pattern=s.INSTANCE_ID,
        description="The registration of the sidecar that opens the stream: bound to it.",
    ),
    last_event_id: str | None = Header(
        None, max_length=64, description="The version last received: resume from it."
    ),
) -> Response:
    registry = request.app.state.plane.registry
    sub = registry.subscribe(actor.name, env, last_event_id, instance)
    return EventStream(registry.events(sub), lambda: registry.unsubscribe(sub))
