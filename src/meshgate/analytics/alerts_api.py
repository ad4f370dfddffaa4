"""The alerts' admin API: levels per product, the alerts made, webhooks and their deliveries."""

# No `from __future__ import annotations`: FastAPI reads the endpoint signatures.

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
)
from sqlalchemy import func, select

from meshgate.analytics import _webhooks
from meshgate.analytics._deliveries import alert_document
from meshgate.analytics.alert_models import Alert, AlertLevels, Delivery, DeliveryAttempt, Webhook
from meshgate.analytics.alerts import LEVELS, list_alerts
from meshgate.control import schemas as s
from meshgate.control._auth import Reader, Writer
from meshgate.control._crud import audit, get_or_404
from meshgate.control._problems import Problem
from meshgate.control.models import Account, Product, utcnow

__all__ = ["MAX_WEBHOOK_BODY", "router"]

router = APIRouter()
# A webhook's settings are a URL and a few words.
MAX_WEBHOOK_BODY = 16 * 1024
ItemId = Path(ge=1, le=s.MAX_ID, description="The resource's id.")


def _level(value: int) -> int:
    if value not in LEVELS:
        raise ValueError(f"a level is one of {', '.join(map(str, LEVELS))}, not {value}")
    return value


# An integer, not 50.0 or "50": stored and compared as the integer it is.
Level = Annotated[int, Strict(), AfterValidator(_level)]
Event = Literal["alert", "violation"]
_EVENTS: tuple[Event, ...] = ("alert", "violation")


def _unique(values: list[Any]) -> list[Any]:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"each value at most once; repeated: {', '.join(map(str, repeated))}")
    return values


def _date_time(value: Any) -> Any:
    # A query parameter is text; a number of seconds would otherwise be taken for a time.
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}", value):
        raise ValueError("must be a date-time, e.g. 2030-01-01T00:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the year 1 in UTC
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


Since = Annotated[datetime, BeforeValidator(_date_time), AfterValidator(_utc)]


def _url(value: str) -> str:
    return _webhooks.check_url(value)


class AlertLevelsIn(s._In):
    levels: Annotated[list[Level], Field(max_length=len(LEVELS)), AfterValidator(_unique)] = Field(
        description="Percent of a limit at which an alert is made: any of 50, 80, 90, 100, "
        "120, 150, 200, 300; none turns alerts off. 100 and over are violations."
    )


class AlertLevelsOut(BaseModel):
    product_id: int
    levels: list[int]


class AlertOut(BaseModel):
    id: int
    at: datetime
    product: str
    application: str
    account_id: int | None
    metric: str
    period: str
    level: int
    usage: int
    limit: int
    violation: bool
    state: Literal["unread", "read"]


WebhookUrl = Annotated[str, StringConstraints(min_length=1, max_length=2000), AfterValidator(_url)]
Events = Annotated[list[Event], Field(min_length=1, max_length=2), AfterValidator(_unique)]
Description = Annotated[str, StringConstraints(max_length=1000)]


class WebhookCreate(s._In):
    url: WebhookUrl
    events: Events = Field(default_factory=lambda: list(_EVENTS))
    enabled: bool = True
    account_id: s.Id | None = Field(
        None, description="Only this account's alerts; none for every account's."
    )
    description: Description = ""


class WebhookUpdate(s._In):
    url: WebhookUrl | None = None
    events: Events | None = None
    enabled: bool | None = None
    description: Description | None = None


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: s.Timestamp
    updated_at: s.Timestamp
    url: str
    events: list[str]
    enabled: bool
    account_id: int | None
    description: str
    secret_hint: str


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Signs every delivery (X-Meshgate-Signature); shown this once.")


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: s.Timestamp
    status_code: int | None
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: str
    alert_id: int
    channel: Literal["webhook", "email"]
    webhook_id: int | None
    recipient: str | None
    event: Event
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: s.Timestamp
    next_at: s.Timestamp | None
    log: list[AttemptOut]


def _plane(request: Request) -> Any:
    return request.app.state.plane


# Levels


@router.get(
    "/products/{item_id}/alert_levels",
    response_model=AlertLevelsOut,
    tags=["alerts"],
    operation_id="read_alert_levels",
    summary="Read a product's alert levels",
)
def read_levels(request: Request, _actor: Reader, item_id: int = ItemId) -> Any:
    with _plane(request).db.session() as session:
        get_or_404(session, Product, item_id, "product")
        row = session.get(AlertLevels, item_id)
        return AlertLevelsOut(product_id=item_id, levels=row.levels if row else [])


@router.put(
    "/products/{item_id}/alert_levels",
    response_model=AlertLevelsOut,
    tags=["alerts"],
    operation_id="set_alert_levels",
    summary="Set a product's alert levels (an empty list turns alerts off)",
)
def set_levels(request: Request, actor: Writer, body: AlertLevelsIn, item_id: int = ItemId) -> Any:
    plane = _plane(request)
    levels = sorted(body.levels)
    with plane.db.writer() as session, session.begin():
        get_or_404(session, Product, item_id, "product")
        row = session.get(AlertLevels, item_id)
        before = {"levels": row.levels} if row else {"levels": []}
        if row is None:
            session.add(AlertLevels(product_id=item_id, levels=levels))
        else:
            row.levels = levels
        if before["levels"] != levels:
            audit(session, actor, "update", "alert_levels", item_id, before, {"levels": levels})
    request.app.state.alerts.levels_changed()
    return AlertLevelsOut(product_id=item_id, levels=levels)


# Alerts


@router.get(
    "/alerts",
    response_model=s.Page[AlertOut],
    tags=["alerts"],
    operation_id="list_alerts",
    summary="List alerts, newest first",
)
def get_alerts(
    request: Request,
    _actor: Reader,
    account_id: int | None = Query(None, ge=1, le=s.MAX_ID),
    application: str | None = Query(None, max_length=200, pattern=s.NO_NUL),
    product: str | None = Query(None, max_length=200, pattern=s.NO_NUL),
    metric: str | None = Query(None, max_length=200, pattern=s.NO_NUL),
    violation: bool | None = Query(None),
    state: Literal["unread", "read"] | None = Query(None),
    since: Since | None = Query(None, description="Alerts made at or after this time."),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with _plane(request).db.session() as session:
        rows, total = list_alerts(
            session,
            account_id=account_id,
            application=application,
            product=product,
            metric=metric,
            violation=violation,
            state=state,
            since=since,
            page=page,
            per_page=per_page,
        )
        items = [alert_document(row) for row in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}


@router.get(
    "/alerts/{item_id}",
    response_model=AlertOut,
    tags=["alerts"],
    operation_id="read_alert",
    summary="Read an alert",
)
def get_alert(request: Request, _actor: Reader, item_id: int = ItemId) -> Any:
    with _plane(request).db.session() as session:
        return alert_document(get_or_404(session, Alert, item_id, "alert"))


@router.post(
    "/alerts/{item_id}/read",
    response_model=AlertOut,
    tags=["alerts"],
    operation_id="mark_alert_read",
    summary="Mark an alert read",
)
def mark_read(request: Request, _actor: Writer, item_id: int = ItemId) -> Any:
    with _plane(request).db.writer() as session, session.begin():
        alert = get_or_404(session, Alert, item_id, "alert")
        alert.state = "read"
        return alert_document(alert)


@router.delete(
    "/alerts/{item_id}",
    status_code=204,
    tags=["alerts"],
    operation_id="delete_alert",
    summary="Delete an alert (and its deliveries)",
)
def delete_alert(request: Request, actor: Writer, item_id: int = ItemId) -> Response:
    with _plane(request).db.writer() as session, session.begin():
        alert = get_or_404(session, Alert, item_id, "alert")
        before = alert_document(alert)
        session.delete(alert)
        audit(session, actor, "delete", "alert", item_id, before, None)
    return Response(status_code=204)


@router.get(
    "/alerts/{item_id}/deliveries",
    response_model=s.Page[DeliveryOut],
    tags=["alerts"],
    operation_id="list_alert_deliveries",
    summary="An alert's deliveries (webhooks and e-mail) with every attempt",
)
def alert_deliveries(
    request: Request,
    _actor: Reader,
    item_id: int = ItemId,
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with _plane(request).db.session() as session:
        get_or_404(session, Alert, item_id, "alert")
        return _deliveries_page(session, Delivery.alert_id == item_id, page, per_page)


# Webhooks


def _webhook_out(row: Webhook, created: bool = False) -> Any:
    data = {
        "id": row.id,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "url": row.url,
        "events": row.events,
        "enabled": row.enabled,
        "account_id": row.account_id,
        "description": row.description,
        "secret_hint": row.secret[:10] + "…",
    }
    if created:
        return WebhookCreated(**data, secret=row.secret)
    return WebhookOut(**data)


def _audited(row: Webhook) -> dict[str, Any]:
    return dict(_webhook_out(row).model_dump(mode="json"))


@router.post(
    "/webhooks",
    status_code=201,
    response_model=WebhookCreated,
    tags=["alerts"],
    operation_id="create_webhook",
    summary="Create a webhook (its signing secret is in the response, once)",
)
def create_webhook(request: Request, response: Response, actor: Writer, body: WebhookCreate) -> Any:
    with _plane(request).db.writer() as session, session.begin():
        if body.account_id is not None and session.get(Account, body.account_id) is None:
            raise Problem(
                422,
                f"account_id: account {body.account_id} does not exist",
                field="body.account_id",
            )
        row = Webhook(
            url=body.url,
            secret=_webhooks.new_secret(),
            events=body.events,
            enabled=body.enabled,
            account_id=body.account_id,
            description=body.description,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        session.add(row)
        session.flush()
        audit(session, actor, "create", "webhook", row.id, None, _audited(row))
        result = _webhook_out(row, created=True)
    response.headers["Location"] = f"/admin/api/webhooks/{row.id}"
    return result


@router.get(
    "/webhooks",
    response_model=s.Page[WebhookOut],
    tags=["alerts"],
    operation_id="list_webhooks",
    summary="List webhooks",
)
def list_webhooks(
    request: Request,
    _actor: Reader,
    account_id: int | None = Query(None, ge=1, le=s.MAX_ID),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    query = select(Webhook)
    if account_id is not None:
        query = query.where(Webhook.account_id == account_id)
    with _plane(request).db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(Webhook.id).offset((page - 1) * per_page).limit(per_page)
        ).all()
        items = [_webhook_out(row) for row in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}


@router.get(
    "/webhooks/{item_id}",
    response_model=WebhookOut,
    tags=["alerts"],
    operation_id="read_webhook",
    summary="Read a webhook",
)
def read_webhook(request: Request, _actor: Reader, item_id: int = ItemId) -> Any:
    with _plane(request).db.session() as session:
        return _webhook_out(get_or_404(session, Webhook, item_id, "webhook"))


@router.patch(
    "/webhooks/{item_id}",
    response_model=WebhookOut,
    tags=["alerts"],
    operation_id="update_webhook",
    summary="Update a webhook",
)
def update_webhook(
    request: Request, actor: Writer, body: WebhookUpdate, item_id: int = ItemId
) -> Any:
    with _plane(request).db.writer() as session, session.begin():
        row = get_or_404(session, Webhook, item_id, "webhook")
        before = _audited(row)
        for key, value in body.model_dump(exclude_unset=True).items():
            if value is not None:
                setattr(row, key, value)
        row.updated_at = utcnow()
        session.flush()
        after = _audited(row)
        if {**after, "updated_at": None} != {**before, "updated_at": None}:
            audit(session, actor, "update", "webhook", item_id, before, after)
        return _webhook_out(row)


@router.post(
    "/webhooks/{item_id}/secret",
    response_model=WebhookCreated,
    tags=["alerts"],
    operation_id="rotate_webhook_secret",
    summary="Give a webhook a new signing secret (in the response, once)",
)
def rotate_secret(request: Request, actor: Writer, item_id: int = ItemId) -> Any:
    with _plane(request).db.writer() as session, session.begin():
        row = get_or_404(session, Webhook, item_id, "webhook")
        row.secret = _webhooks.new_secret()
        row.updated_at = utcnow()
        audit(session, actor, "rotate", "webhook", item_id, None, None)
        return _webhook_out(row, created=True)


@router.delete(
    "/webhooks/{item_id}",
    status_code=204,
    tags=["alerts"],
    operation_id="delete_webhook",
    summary="Delete a webhook (and its delivery log)",
)
def delete_webhook(request: Request, actor: Writer, item_id: int = ItemId) -> Response:
    with _plane(request).db.writer() as session, session.begin():
        row = get_or_404(session, Webhook, item_id, "webhook")
        before = _audited(row)
        session.delete(row)
        audit(session, actor, "delete", "webhook", item_id, before, None)
    return Response(status_code=204)


@router.get(
    "/webhooks/{item_id}/deliveries",
    response_model=s.Page[DeliveryOut],
    tags=["alerts"],
    operation_id="list_webhook_deliveries",
    summary="A webhook's deliveries, newest first, with every attempt",
)
def webhook_deliveries(
    request: Request,
    _actor: Reader,
    item_id: int = ItemId,
    state: Literal["pending", "delivered", "failed"] | None = Query(None),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    with _plane(request).db.session() as session:
        get_or_404(session, Webhook, item_id, "webhook")
        where = [Delivery.webhook_id == item_id]
        if state is not None:
            where.append(Delivery.state == state)
        return _deliveries_page(session, where, page, per_page)


def _deliveries_page(session: Any, where: Any, page: int, per_page: int) -> dict[str, Any]:
    conditions = where if isinstance(where, list) else [where]
    query = select(Delivery).where(*conditions)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Delivery.created_at.desc(), Delivery.id)
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    attempts: dict[str, list[DeliveryAttempt]] = {row.id: [] for row in rows}
    if rows:
        for attempt in session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(list(attempts)))
            .order_by(DeliveryAttempt.id)
        ):
            attempts[attempt.delivery_id].append(attempt)
    items = [
        DeliveryOut(
            id=row.id,
            alert_id=row.alert_id,
            channel=row.channel,
            webhook_id=row.webhook_id,
            recipient=row.recipient,
            event=row.event,
            state=row.state,
            attempts=row.attempts,
            created_at=row.created_at,
            next_at=row.next_at if row.state == "pending" else None,
            log=[AttemptOut.model_validate(a) for a in attempts[row.id]],
        )
        for row in rows
    ]
    return {"items": items, "page": page, "per_page": per_page, "total": total}
