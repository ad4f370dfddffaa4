"""Applications: creation with a first key, keys shown once, suspend / resume, plan change."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Header, Path, Request, Response
from sqlalchemy import func, select

from meshgate.config import hash_key, new_key
from meshgate.control import schemas as s
from meshgate.control._auth import Actor, Reader, Writer
from meshgate.control._crud import audit, check_if_match, etag, get_or_404
from meshgate.control._problems import Problem
from meshgate.control.models import Account, Application, ApplicationKey, Plan, Product, utcnow

__all__ = ["router", "MAX_KEYS"]

router = APIRouter(tags=["applications"])
# As 3scale: a handful of keys per application, enough to rotate without downtime.
MAX_KEYS = 5
KEYED_AUTH = ("api_key", "app_id_key")
AppId = Path(ge=1, le=s.MAX_ID)


def _dump(row: Application) -> dict[str, Any]:
    return s.ApplicationOut.model_validate(row).model_dump(mode="json")


def _add_key(
    session: Any, app: Application, product: Product, key: str | None
) -> tuple[ApplicationKey, str]:
    if product.auth.get("type") not in KEYED_AUTH:
        raise Problem(
            409,
            f"product {product.name!r} authenticates with {product.auth.get('type')}: "
            "its applications have no keys",
        )
    count = session.scalar(select(func.count()).where(ApplicationKey.application_id == app.id))
    if count >= MAX_KEYS:
        raise Problem(409, f"an application holds at most {MAX_KEYS} keys: delete one first")
    clear = key or new_key()
    digest = hash_key(product.key_salt, clear)
    taken = session.scalar(
        select(ApplicationKey.id).where(
            ApplicationKey.product_id == product.id, ApplicationKey.key_hash == digest
        )
    )
    if taken is not None:
        raise Problem(409, "this key is already in use in this product", field="body.key")
    row = ApplicationKey(
        application_id=app.id, product_id=product.id, key_hash=digest, hint=clear[:4] + "…"
    )
    session.add(row)
    session.flush()
    return row, clear


@router.post(
    "/applications",
    status_code=201,
    response_model=s.ApplicationCreated,
    operation_id="create_application",
    summary="Create an application (its first key is in the response, once)",
)
def create_application(
    request: Request,
    actor: Writer,
    response: Response,
    body: s.ApplicationCreate,
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        if session.get(Account, body.account_id) is None:
            raise Problem(
                422,
                f"account_id: account {body.account_id} does not exist",
                field="body.account_id",
            )
        plan = session.get(Plan, body.plan_id)
        if plan is None:
            raise Problem(422, f"plan_id: plan {body.plan_id} does not exist", field="body.plan_id")
        product = session.get(Product, plan.product_id)
        assert product is not None
        app = Application(
            account_id=body.account_id,
            plan_id=plan.id,
            product_id=plan.product_id,
            name=body.name,
            description=body.description,
            app_id=body.app_id or secrets.token_hex(8),
            state="pending" if plan.approval_required else "live",
            trial_ends_at=utcnow() + timedelta(days=plan.trial_days) if plan.trial_days else None,
            certificates=[c.model_dump(exclude_none=True) for c in body.certificates] or None,
        )
        session.add(app)
        session.flush()
        key = None
        if product.auth.get("type") in KEYED_AUTH:
            _, key = _add_key(session, app, product, None)
        audit(session, actor, "create", "application", app.id, None, _dump(app))
        result = s.ApplicationCreated.model_validate(app)
        result.key = key
    plane.changed("live")
    response.headers["ETag"] = etag(app)
    response.headers["Location"] = f"/admin/api/applications/{app.id}"
    return result


def _transition(
    request: Request,
    response: Response,
    item_id: int,
    if_match: str | None,
    actor: Actor,
    action: str,
    allowed_from: tuple[str, ...],
    to: str,
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        app = get_or_404(session, Application, item_id, "application")
        check_if_match(app, if_match)
        response.headers["ETag"] = etag(app)
        if app.state == to:
            return s.ApplicationOut.model_validate(app)
        if app.state not in allowed_from:
            raise Problem(409, f"a {app.state} application cannot be {_PAST[action]}")
        before = _dump(app)
        app.state = to
        session.flush()
        audit(session, actor, action, "application", app.id, before, _dump(app))
        result = s.ApplicationOut.model_validate(app)
    plane.changed("live")
    response.headers["ETag"] = etag(app)
    return result


IfMatch = Header(None, max_length=1000)
_PAST = {"suspend": "suspended", "resume": "resumed", "accept": "accepted"}


@router.post(
    "/applications/{item_id}/suspend",
    response_model=s.ApplicationOut,
    operation_id="suspend_application",
    summary="Suspend: refused at gateways",
)
def suspend(
    request: Request,
    response: Response,
    actor: Writer,
    item_id: int = AppId,
    if_match: str | None = IfMatch,
) -> Any:
    return _transition(
        request, response, item_id, if_match, actor, "suspend", ("live", "pending"), "suspended"
    )


@router.post(
    "/applications/{item_id}/resume",
    response_model=s.ApplicationOut,
    operation_id="resume_application",
    summary="Resume a suspended application",
)
def resume(
    request: Request,
    response: Response,
    actor: Writer,
    item_id: int = AppId,
    if_match: str | None = IfMatch,
) -> Any:
    return _transition(
        request, response, item_id, if_match, actor, "resume", ("suspended",), "live"
    )


@router.post(
    "/applications/{item_id}/accept",
    response_model=s.ApplicationOut,
    operation_id="accept_application",
    summary="Accept a pending application (plans that require approval)",
)
def accept(
    request: Request,
    response: Response,
    actor: Writer,
    item_id: int = AppId,
    if_match: str | None = IfMatch,
) -> Any:
    return _transition(request, response, item_id, if_match, actor, "accept", ("pending",), "live")


@router.post(
    "/applications/{item_id}/change_plan",
    response_model=s.ApplicationOut,
    operation_id="change_application_plan",
    summary="Move the application to another plan of the same product",
)
def change_plan(
    request: Request,
    response: Response,
    actor: Writer,
    body: s.PlanChange,
    item_id: int = AppId,
    if_match: str | None = IfMatch,
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        app = get_or_404(session, Application, item_id, "application")
        check_if_match(app, if_match)
        plan = session.get(Plan, body.plan_id)
        if plan is None or plan.product_id != app.product_id:
            raise Problem(
                422,
                f"plan_id: plan {body.plan_id} is not a plan of the application's product",
                field="body.plan_id",
            )
        before = _dump(app)
        app.plan_id = plan.id
        session.flush()
        if before != _dump(app):
            audit(session, actor, "change_plan", "application", app.id, before, _dump(app))
        result = s.ApplicationOut.model_validate(app)
    plane.changed("live")
    response.headers["ETag"] = etag(app)
    return result


@router.get(
    "/applications/{item_id}/keys",
    response_model=list[s.KeyOut],
    operation_id="list_application_keys",
    summary="The keys (hints only)",
)
def list_keys(request: Request, _actor: Reader, item_id: int = AppId) -> Any:
    with request.app.state.plane.db.session() as session:
        get_or_404(session, Application, item_id, "application")
        rows = session.scalars(
            select(ApplicationKey)
            .where(ApplicationKey.application_id == item_id)
            .order_by(ApplicationKey.id)
        ).all()
        return [s.KeyOut.model_validate(r) for r in rows]


@router.post(
    "/applications/{item_id}/keys",
    status_code=201,
    response_model=s.KeyCreated,
    operation_id="create_application_key",
    summary="Add a key; the key is in this response only",
)
def create_key(
    request: Request,
    actor: Writer,
    body: s.KeyCreate,
    item_id: int = AppId,
) -> Any:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        app = get_or_404(session, Application, item_id, "application")
        product = session.get(Product, app.product_id)
        assert product is not None
        row, clear = _add_key(session, app, product, body.key)
        audit(
            session,
            actor,
            "create",
            "application_key",
            row.id,
            None,
            {"application_id": app.id, "hint": row.hint},
        )
        result = s.KeyCreated(id=row.id, hint=row.hint, created_at=row.created_at, key=clear)
    plane.changed("live")
    return result


@router.delete(
    "/applications/{item_id}/keys/{key_id}",
    status_code=204,
    operation_id="delete_application_key",
    summary="Revoke a key",
)
def delete_key(
    request: Request,
    actor: Writer,
    item_id: int = AppId,
    key_id: int = Path(ge=1, le=s.MAX_ID),
) -> Response:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        row = session.get(ApplicationKey, key_id)
        if row is None or row.application_id != item_id:
            raise Problem(404, f"application {item_id} has no key {key_id}")
        audit(
            session,
            actor,
            "delete",
            "application_key",
            key_id,
            {"application_id": item_id, "hint": row.hint},
            None,
        )
        session.delete(row)
    plane.changed("live")
    return Response(status_code=204)
