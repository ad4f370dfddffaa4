"""Environments and their snapshots, promotion and rollback, the data planes, admin tokens
and the audit log; and the data-plane API gateways pull their snapshot from."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from meshgate.control import schemas as s
from meshgate.control import snapshots
from meshgate.control._auth import DataplaneActor, Reader, Writer, hash_token, new_token
from meshgate.control._crud import audit, get_or_404
from meshgate.control._problems import Problem
from meshgate.control.models import (
    AdminToken,
    AuditEntry,
    Dataplane,
    EnvironmentProduct,
    Product,
    Snapshot,
    utcnow,
)

__all__ = ["admin", "dataplane", "long_poll"]

admin = APIRouter()
dataplane = APIRouter(prefix="/dp/v1", tags=["data plane"])

EnvPath = Annotated[s.Env, Path(description="staging or production")]
# A gateway counts as connected when it was seen this recently.
CONNECTED_SECONDS = 60


# Environments


@admin.get(
    "/environments",
    response_model=list[s.EnvironmentOut],
    tags=["environments"],
    operation_id="list_environments",
)
def environments(request: Request, _actor: Reader) -> Any:
    plane = request.app.state.plane
    out = []
    with plane.db.session() as session:
        for env in snapshots.ENVIRONMENTS:
            last = snapshots.latest(session, env)
            names = session.scalars(
                select(Product.name)
                .join(EnvironmentProduct, EnvironmentProduct.product_id == Product.id)
                .where(EnvironmentProduct.env == env)
                .order_by(Product.name)
            ).all()
            out.append(
                s.EnvironmentOut(
                    name=env,
                    version=last.version if last else None,
                    created_at=last.created_at if last else None,
                    products=list(names),
                    errors=plane.errors.get(env, []),
                )
            )
    return out


@admin.get(
    "/environments/{env}/snapshots",
    response_model=s.Page[s.SnapshotOut],
    tags=["environments"],
    operation_id="list_snapshots",
)
def list_snapshots(
    request: Request,
    _actor: Reader,
    env: EnvPath,
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with request.app.state.plane.db.session() as session:
        total = snapshots.versions(session, env)
        rows = session.scalars(
            select(Snapshot)
            .where(Snapshot.env == env)
            .order_by(Snapshot.version.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
        items = [s.SnapshotOut.model_validate(r) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}


@admin.get(
    "/environments/{env}/snapshots/{version}",
    tags=["environments"],
    operation_id="read_snapshot",
    summary="The snapshot document of one version",
    responses={200: {"content": {"application/json": {}}}},
)
def read_snapshot(
    request: Request,
    _actor: Reader,
    env: EnvPath,
    version: int = Path(ge=1, le=s.MAX_ID),
) -> Response:
    with request.app.state.plane.db.session() as session:
        row = session.scalars(
            select(Snapshot).where(Snapshot.env == env, Snapshot.version == version)
        ).first()
        if row is None:
            raise Problem(404, f"{env} has no version {version}")
        return Response(row.document, media_type="application/json")


def _version(session: Any, env: str) -> int | None:
    last = snapshots.latest(session, env)
    return None if last is None else last.version


def _published(plane: Any, env: str, reason: str, since: int | None) -> s.Published:
    """Publish ``env`` now; ``changed`` when its version moved past ``since`` (the background
    compile may have published the change first)."""
    plane.publish(env, reason)
    with plane.db.session() as session:
        version = _version(session, env)
    return s.Published(
        env=env, version=version, changed=version != since, errors=plane.errors.get(env, [])
    )


@admin.post(
    "/products/{item_id}/promote",
    tags=["environments"],
    operation_id="promote_product",
    summary="Copy the product's staging configuration to production",
    response_model=s.Published,
)
def promote(
    request: Request,
    actor: Writer,
    item_id: int = Path(ge=1, le=s.MAX_ID),
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        product = get_or_404(session, Product, item_id, "product")
        staged = session.get(EnvironmentProduct, ("staging", item_id))
        if staged is None:
            raise Problem(409, f"product {product.name!r} has nothing staged")
        current = session.get(EnvironmentProduct, ("production", item_id))
        before = None if current is None else current.document
        if current is None:
            session.add(
                EnvironmentProduct(env="production", product_id=item_id, document=staged.document)
            )
        else:
            current.document = staged.document
        audit(session, actor, "promote", "product", item_id, before, staged.document)
        name = product.name
        since = _version(session, "production")
    return _published(plane, "production", f"promote {name}", since)


@admin.post(
    "/environments/{env}/rollback",
    tags=["environments"],
    operation_id="rollback_environment",
    summary="Return the environment's product configurations to those of a version; "
    "applications, keys and plans stay current",
    response_model=s.Published,
)
def rollback(
    request: Request,
    actor: Writer,
    env: EnvPath,
    to: int = Query(ge=1, le=s.MAX_ID, description="The version to return to."),
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        row = session.scalars(
            select(Snapshot).where(Snapshot.env == env, Snapshot.version == to)
        ).first()
        if row is None:
            raise Problem(404, f"{env} has no version {to}", field="query.to")
        since = _version(session, env)
        skipped = snapshots.restore(session, env, json.loads(row.document))
        audit(
            session,
            actor,
            "rollback",
            "environment",
            env,
            {"version": since},
            {"to": to, "skipped": skipped},
        )
    result = _published(plane, env, f"rollback to {to}", since)
    result.skipped = skipped
    return result


# Data planes


@admin.get(
    "/dataplanes",
    response_model=list[s.DataplaneOut],
    tags=["environments"],
    operation_id="list_dataplanes",
    summary="Gateways, the version each runs, last seen",
)
def dataplanes(
    request: Request,
    _actor: Reader,
    env: s.Env | None = None,
) -> Any:
    with request.app.state.plane.db.session() as session:
        query = select(Dataplane).order_by(Dataplane.id)
        if env is not None:
            query = query.where(Dataplane.env == env)
        rows = session.scalars(query).all()
    now = datetime.now(UTC)
    out = []
    for row in rows:
        seen = row.last_seen if row.last_seen.tzinfo else row.last_seen.replace(tzinfo=UTC)
        item = s.DataplaneOut.model_validate(row)
        item.connected = now - seen < timedelta(seconds=CONNECTED_SECONDS)
        out.append(item)
    return out


def _seen(plane: Any, status: s.DataplaneStatus | None, dp_id: str, env: str) -> None:
    # A gateway's first pull and first report can race to insert its row: the loser updates.
    for attempt in (1, 2):
        try:
            with plane.db.writer() as session, session.begin():
                row = session.get(Dataplane, dp_id)
                if row is None:
                    row = Dataplane(id=dp_id, env=env)
                    session.add(row)
                row.env = env
                row.last_seen = utcnow()
                if status is not None:
                    row.version = status.version
                    row.error = status.error
                    row.hostname = status.hostname
                    row.listen = status.listen
                    row.pid = status.pid
            return
        except IntegrityError:
            if attempt == 2:
                raise


@dataplane.get(
    "/snapshot",
    operation_id="pull_snapshot",
    summary="The environment's snapshot; 304 when If-None-Match still holds after "
    "waiting up to `wait` seconds for a new version",
    responses={200: {"content": {"application/json": {}}}, 304: {}},
)
async def pull_snapshot(
    request: Request,
    _actor: DataplaneActor,
    env: s.Env,
    wait: float = Query(0, ge=0, le=60),
    if_none_match: str | None = Header(None, max_length=200),
    x_meshgate_dataplane: str | None = Header(None, max_length=200, pattern=r"^[\x21-\x7e]+$"),
) -> Response:
    plane = request.app.state.plane
    if x_meshgate_dataplane:
        last = plane.dataplane_seen.get(x_meshgate_dataplane, 0.0)
        if time.monotonic() - last > 5:
            plane.dataplane_seen[x_meshgate_dataplane] = time.monotonic()
            await run_in_threadpool(_seen, plane, None, x_meshgate_dataplane, env)
    return await long_poll(
        plane, env, lambda: plane.latest(env), wait, if_none_match, f"{env} has no snapshot yet"
    )


async def long_poll(
    plane: Any,
    channel: str,
    latest: Callable[[], Any],
    wait: float,
    if_none_match: str | None,
    missing: str,
) -> Response:
    """The newest version ``latest()`` gives, or 304 when ``If-None-Match`` still names it
    after waiting up to ``wait`` seconds for a new version of ``channel``."""
    deadline = time.monotonic() + min(wait, plane.settings.max_wait)
    waiting = plane.metrics.long_polls.labels("mesh" if channel.startswith("mesh") else "gateway")
    waiting.inc()
    try:
        return await _long_poll(plane, channel, latest, deadline, if_none_match, missing)
    finally:
        waiting.dec()


async def _long_poll(
    plane: Any,
    channel: str,
    latest: Callable[[], Any],
    deadline: float,
    if_none_match: str | None,
    missing: str,
) -> Response:
    while True:
        current = await run_in_threadpool(latest)
        if current is None:
            raise Problem(503, missing, headers={"Retry-After": "1"})
        if if_none_match != current.etag:
            return Response(
                current.body,
                media_type="application/json",
                headers={"ETag": current.etag, "X-Meshgate-Version": str(current.version)},
            )
        left = deadline - time.monotonic()
        if left <= 0 or plane.closing:
            return Response(status_code=304, headers={"ETag": current.etag})
        # Woken by a local publish; the store is read again at least every 2 s for the
        # versions other control-plane replicas publish.
        await plane.wait_for_change(channel, min(left, 2.0))


@dataplane.post(
    "/status",
    status_code=204,
    operation_id="report_status",
    summary="A gateway reports the version it runs or the error that made it keep "
    "the last good one",
)
async def report_status(
    request: Request,
    _actor: DataplaneActor,
    body: s.DataplaneStatus,
) -> Response:
    plane = request.app.state.plane
    await run_in_threadpool(_seen, plane, body, body.id, body.env)
    return Response(status_code=204)


# Admin tokens


@admin.get("/tokens", response_model=list[s.TokenOut], tags=["tokens"], operation_id="list_tokens")
def list_tokens(request: Request, _actor: Writer) -> Any:
    with request.app.state.plane.db.session() as session:
        rows = session.scalars(select(AdminToken).order_by(AdminToken.id)).all()
        return [s.TokenOut.model_validate(r) for r in rows]


@admin.post(
    "/tokens",
    status_code=201,
    response_model=s.TokenCreated,
    tags=["tokens"],
    operation_id="create_token",
    summary="A new token; shown in this response only",
)
def create_token(request: Request, body: s.TokenCreate, actor: Writer) -> Any:
    token = new_token()
    with request.app.state.plane.db.writer() as session, session.begin():
        taken = session.scalar(select(AdminToken.id).where(AdminToken.name == body.name))
        if taken is not None:
            raise Problem(409, f"a token named {body.name!r} exists", field="body.name")
        row = AdminToken(
            name=body.name,
            token_hash=hash_token(token),
            scopes=sorted(set(body.scopes)),
            expires_at=body.expires_at,
        )
        session.add(row)
        session.flush()
        audit(
            session,
            actor,
            "create",
            "token",
            row.id,
            None,
            {"name": row.name, "scopes": row.scopes},
        )
        out = s.TokenOut.model_validate(row)
    return s.TokenCreated(**out.model_dump(), token=token)


@admin.delete("/tokens/{item_id}", status_code=204, tags=["tokens"], operation_id="delete_token")
def delete_token(
    request: Request,
    actor: Writer,
    item_id: int = Path(ge=1, le=s.MAX_ID),
) -> Response:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        row = get_or_404(session, AdminToken, item_id, "token")
        if "write" in row.scopes:
            writers = session.scalars(select(AdminToken.scopes)).all()
            if sum("write" in scopes for scopes in writers) == 1:
                # Nobody could make a token again: the control plane would be read-only.
                raise Problem(
                    409, "this is the last token with the write scope: make another first"
                )
        audit(
            session,
            actor,
            "delete",
            "token",
            item_id,
            {"name": row.name, "scopes": row.scopes},
            None,
        )
        session.delete(row)
    plane.tokens.clear()
    return Response(status_code=204)


# Audit log


@admin.get(
    "/audit",
    response_model=s.Page[s.AuditOut],
    tags=["audit"],
    operation_id="list_audit_entries",
    summary="Every change, newest first",
)
def audit_log(
    request: Request,
    _actor: Reader,
    resource: str | None = Query(None, max_length=64, pattern=s.NO_NUL),
    resource_id: str | None = Query(None, max_length=64, pattern=s.NO_NUL),
    actor: str | None = Query(None, max_length=200, pattern=s.NO_NUL),
    action: str | None = Query(None, max_length=32, pattern=s.NO_NUL),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    query = select(AuditEntry)
    for column, value in (
        (AuditEntry.resource, resource),
        (AuditEntry.resource_id, resource_id),
        (AuditEntry.actor, actor),
        (AuditEntry.action, action),
    ):
        if value is not None:
            query = query.where(column == value)
    with request.app.state.plane.db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(AuditEntry.id.desc()).offset((page - 1) * per_page).limit(per_page)
        ).all()
        items = [s.AuditOut.model_validate(r) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}
