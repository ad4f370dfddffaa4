"""The analytics API: gateways' usage batches in (``/dp/v1/usage``), series and summaries out
(``/admin/api/analytics``), as JSON or CSV.

Every query reads one granularity's roll-ups over a range of windows: a series is one indexed
range scan, whatever the range. A token with the ``usage`` scope (made per account, for the
developer portal) reads only its own account's applications.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from sqlalchemy import delete, event, func, select, update
from sqlalchemy.orm import Session

from meshgate.analytics import ingest as _ingest
from meshgate.analytics.models import LatencyRollup, ResponseRollup, UsageRollup
from meshgate.analytics.windows import (
    GRANULARITY_SECONDS,
    next_start,
    usage_in_periods,
    window_start,
)
from meshgate.config.periods import window
from meshgate.config.usage import LATENCY_BOUNDS_MS, MAX_BATCH_BYTES, UsageBatch
from meshgate.control._auth import (
    Actor,
    DataplaneActor,
    Writer,
    _authenticate,
    bearer,
    hash_token,
    new_token,
)
from meshgate.control._crud import audit
from meshgate.control._problems import Problem
from meshgate.control.models import (
    Account,
    AdminToken,
    Application,
    Dataplane,
    Limit,
    Metric,
    Plan,
    Product,
)
from meshgate.control.schemas import UtcTime

__all__ = ["MAX_POINTS", "admin", "dataplane"]

admin = APIRouter(prefix="/analytics", tags=["analytics"])
dataplane = APIRouter(prefix="/dp/v1", tags=["data plane"])

# Windows in one series: a year of hours is 8,760.
MAX_POINTS = 10_000
# Ranges lie within these (epoch seconds): every window of them has a calendar date.
_EARLIEST = 0
_LATEST = int(datetime(9999, 1, 1, tzinfo=UTC).timestamp())
Granularity = Literal["minute", "hour", "day", "month"]


# Who may read: a read token, or a usage token limited to one account.


class Caller:
    """The caller and the account it is limited to (None: every account)."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.account_id: int | None = None
        if "read" not in actor.scopes:
            accounts = [s for s in actor.scopes if s.startswith("account:")]
            if "usage" not in actor.scopes or len(accounts) != 1:
                raise Problem(403, "the token lacks the 'read' scope")
            self.account_id = int(accounts[0].split(":", 1)[1])

    def application(self, session: Session, app_id: str) -> Application | None:
        """The application, refused (404, as if absent) when it is not the caller's."""
        row = session.scalar(select(Application).where(Application.app_id == app_id))
        if row is not None and self.account_id not in (None, row.account_id):
            row = None
        return row


def _reader(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Caller:
    token = credentials.credentials if credentials is not None else ""
    caller = Caller(_authenticate(request, f"Bearer {token}"))
    if caller.account_id is not None:
        # Its account deleted, the token went too; the token cache may not know it yet.
        with request.app.state.plane.db.session() as session:
            if session.get(Account, caller.account_id) is None:
                raise Problem(401, "the token is not valid or has expired")
    return caller


UsageReader = Annotated[Caller, Depends(_reader)]


# Ranges


class _Range:
    """``since`` .. ``until`` at a granularity, as window starts; refused when reversed or
    longer than MAX_POINTS windows."""

    def __init__(self, granularity: str, since: datetime | None, until: datetime | None) -> None:
        now = datetime.now(UTC)
        until_t = _epoch(until) if until is not None else int(now.timestamp()) + 1
        since_t = (
            _epoch(since)
            if since is not None
            else until_t - 30 * GRANULARITY_SECONDS[granularity]
            if granularity != "month"
            else until_t - 365 * 86400
        )
        if since_t >= until_t:
            raise Problem(422, "since must be before until", field="query.since")
        for moment, name in ((since_t, "since"), (until_t, "until")):
            if not _EARLIEST <= moment <= _LATEST:
                raise Problem(
                    422,
                    f"the range's {name} must lie between 1970-01-01 and 9999-01-01",
                    field=f"query.{name}",
                )
        self.granularity = granularity
        self.first = window_start(granularity, since_t)
        self.until = until_t
        points = math.ceil((until_t - self.first) / GRANULARITY_SECONDS[granularity])
        if granularity == "month":
            points = math.ceil((until_t - self.first) / (28 * 86400))
        if points > MAX_POINTS:
            raise Problem(
                422,
                f"the range holds about {points} {granularity} windows, at most {MAX_POINTS}: "
                "shorten it or choose a coarser granularity",
                field="query.since",
            )

    def starts(self) -> list[int]:
        out, start = [], self.first
        while start < self.until:
            out.append(start)
            start = next_start(self.granularity, start)
        return out


def _epoch(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return math.floor(moment.timestamp())
    except (OverflowError, ValueError):
        raise Problem(422, "the time is out of range", field="query.since") from None


def _iso(start: int) -> str:
    return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Since = Annotated[
    UtcTime | None,
    Query(description="Start (ISO 8601, UTC when no offset); default: 30 windows ago"),
]
Until = Annotated[UtcTime | None, Query(description="End, exclusive (ISO 8601); default: now")]
Format = Annotated[Literal["json", "csv"], Query(description="json, or csv for a spreadsheet")]
Name = Annotated[str | None, Query(max_length=200)]
# Series answer JSON, or CSV when asked.
_JSON_OR_CSV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}}
}


def _csv(rows: list[dict[str, Any]], columns: list[str], name: str) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        # A spreadsheet runs a cell starting with = + - @ (or a tab or CR before one) as a
        # formula: quote it.
        writer.writerow(
            [
                "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v
                for v in (row.get(c, "") for c in columns)
            ]
        )
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


# Data plane: usage batches in


@dataplane.post(
    "/usage",
    operation_id="report_usage",
    summary="A gateway's usage since its last batch; a batch sent again with the same id is "
    "acknowledged and not counted again",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": UsageBatch.model_json_schema()}},
        }
    },
)
async def report_usage(
    request: Request,
    _actor: DataplaneActor,
    x_meshgate_dataplane: str = Header(max_length=200, pattern=r"^[\x21-\x7e]+$"),
) -> dict[str, Any]:
    plane = request.app.state.plane
    body = await request.body()
    if len(body) > MAX_BATCH_BYTES:
        raise Problem(413, f"a usage batch is at most {MAX_BATCH_BYTES} bytes")

    def store() -> bool:
        with plane.db.session() as session:
            if session.get(Dataplane, x_meshgate_dataplane) is None:
                raise Problem(
                    403,
                    f"dataplane {x_meshgate_dataplane!r} is unknown: a gateway reports usage "
                    "after it has pulled a snapshot",
                )
        try:
            batch = UsageBatch.model_validate_json(body)
        except ValidationError as exc:
            malformed = any(e["type"] == "json_invalid" for e in exc.errors())
            raise Problem(
                400 if malformed else 422,
                f"the usage batch is invalid: {exc.error_count()} error(s)",
                errors=[
                    {"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)[:20]
                ],
            ) from None
        try:
            return _ingest.ingest(plane.db, batch, x_meshgate_dataplane, plane.usage_listeners)
        except _ingest.BatchTooLarge as exc:
            raise Problem(422, f"the usage batch is invalid: {exc}") from None

    stored = await run_in_threadpool(store)
    return {"accepted": True, "duplicate": not stored}


# Admin: series and summaries


@admin.get(
    "/usage",
    operation_id="usage_series",
    responses=_JSON_OR_CSV,
    summary="A metric's usage over time",
)
def usage_series(
    request: Request,
    reader: UsageReader,
    metric: Annotated[str, Query(max_length=200)] = "hits",
    product: Name = None,
    application: Name = None,
    account_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    format: Format = "json",
) -> Any:
    span = _Range(granularity, since, until)
    t = UsageRollup
    with request.app.state.plane.db.session() as session:
        query = select(t.start, func.sum(t.value)).where(
            t.granularity == granularity,
            t.metric == metric,
            t.start >= span.first,
            t.start < span.until,
        )
        if reader.account_id is not None:
            if account_id not in (None, reader.account_id):
                raise Problem(404, f"account {account_id} does not exist")
            account_id = reader.account_id
        if application is not None:
            if reader.application(session, application) is None and reader.account_id:
                raise Problem(404, f"application {application!r} does not exist")
            query = query.where(t.application == application)
        if product is not None:
            query = query.where(t.product == product)
        if account_id is not None:
            query = query.where(t.account_id == account_id)
        values = dict(session.execute(query.group_by(t.start)).all())
    series = [{"start": _iso(s), "value": int(values.get(s, 0))} for s in span.starts()]
    if format == "csv":
        return _csv(series, ["start", "value"], f"usage-{metric}-{granularity}")
    return {
        "metric": metric,
        "granularity": granularity,
        "since": _iso(span.first),
        "until": _iso(span.until),
        "total": sum(p["value"] for p in series),  # type: ignore[misc]
        "series": series,
    }


@admin.get(
    "/top_applications",
    operation_id="top_applications",
    responses=_JSON_OR_CSV,
    summary="The applications that used a metric most in a range",
)
def top_applications(
    request: Request,
    reader: UsageReader,
    metric: Annotated[str, Query(max_length=200)] = "hits",
    product: Name = None,
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    format: Format = "json",
) -> Any:
    span = _Range(granularity, since, until)
    t = UsageRollup
    total = func.sum(t.value)
    query = select(t.application, t.product, func.max(t.account_id), total).where(
        t.granularity == granularity,
        t.metric == metric,
        t.start >= span.first,
        t.start < span.until,
    )
    if product is not None:
        query = query.where(t.product == product)
    if reader.account_id is not None:
        query = query.where(t.account_id == reader.account_id)
    query = query.group_by(t.application, t.product).order_by(total.desc(), t.application)
    with request.app.state.plane.db.session() as session:
        rows = [
            {"application": a, "product": p, "account_id": acc, "value": int(v)}
            for a, p, acc, v in session.execute(query.limit(limit))
        ]
    if format == "csv":
        return _csv(rows, ["application", "product", "account_id", "value"], "top-applications")
    return {"metric": metric, "since": _iso(span.first), "until": _iso(span.until), "items": rows}


@admin.get(
    "/responses",
    operation_id="response_codes",
    responses=_JSON_OR_CSV,
    summary="Responses by status code and reason, in total and by class over time",
)
def response_codes(
    request: Request,
    reader: UsageReader,
    product: Name = None,
    application: Name = None,
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    format: Format = "json",
) -> Any:
    span = _Range(granularity, since, until)
    t = ResponseRollup
    query = select(t.start, t.status, t.reason, func.sum(t.count)).where(
        t.granularity == granularity, t.start >= span.first, t.start < span.until
    )
    with request.app.state.plane.db.session() as session:
        if reader.account_id is not None:
            if application is None:
                raise Problem(403, "a usage token reads the responses of one application")
            if reader.application(session, application) is None:
                raise Problem(404, f"application {application!r} does not exist")
        if product is not None:
            query = query.where(t.product == product)
        if application is not None:
            query = query.where(t.application == application)
        rows = session.execute(query.group_by(t.start, t.status, t.reason)).all()
    totals: dict[tuple[int, str], int] = {}
    by_window: dict[int, dict[str, int]] = {}
    for start, status, reason, count in rows:
        totals[(status, reason)] = totals.get((status, reason), 0) + int(count)
        window_counts = by_window.setdefault(start, {})
        klass = f"{status // 100}xx"
        window_counts[klass] = window_counts.get(klass, 0) + int(count)
    classes = ["1xx", "2xx", "3xx", "4xx", "5xx"]
    series = [
        {"start": _iso(s), **{c: by_window.get(s, {}).get(c, 0) for c in classes}}
        for s in span.starts()
    ]
    if format == "csv":
        return _csv(series, ["start", *classes], f"responses-{granularity}")
    return {
        "since": _iso(span.first),
        "until": _iso(span.until),
        "totals": [
            {"status": st, "reason": r, "count": c} for (st, r), c in sorted(totals.items())
        ],
        "series": series,
    }


def percentile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram over LATENCY_BOUNDS_MS, interpolated linearly
    within its bucket; the open top bucket answers its lower bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = LATENCY_BOUNDS_MS[index - 1] if index else 0.0
            if index == len(LATENCY_BOUNDS_MS):
                return float(low)
            high = LATENCY_BOUNDS_MS[index]
            return round(low + (high - low) * (rank - seen) / count, 3)
        seen += count
    return float(LATENCY_BOUNDS_MS[-1])


@admin.get(
    "/latency",
    operation_id="latency",
    responses=_JSON_OR_CSV,
    summary="A product's response time percentiles over a range, and per window",
)
def latency(
    request: Request,
    reader: UsageReader,
    product: Name = None,
    granularity: Granularity = "hour",
    since: Since = None,
    until: Until = None,
    format: Format = "json",
) -> Any:
    if reader.account_id is not None:
        raise Problem(403, "the token lacks the 'read' scope")
    span = _Range(granularity, since, until)
    t = LatencyRollup
    query = select(t.start, t.bucket, func.sum(t.count)).where(
        t.granularity == granularity, t.start >= span.first, t.start < span.until
    )
    if product is not None:
        query = query.where(t.product == product)
    with request.app.state.plane.db.session() as session:
        rows = session.execute(query.group_by(t.start, t.bucket)).all()
    size = len(LATENCY_BOUNDS_MS) + 1
    whole = [0] * size
    ms_sum = 0
    per: dict[int, list[int]] = {}
    for start, bucket, count in rows:
        if bucket < 0:
            ms_sum += int(count)
            continue
        whole[bucket] += int(count)
        per.setdefault(start, [0] * size)[bucket] += int(count)
    count = sum(whole)
    series = [
        {
            "start": _iso(s),
            "count": sum(per.get(s, ())),
            "p50": percentile(per.get(s, []), 0.5),
            "p99": percentile(per.get(s, []), 0.99),
        }
        for s in span.starts()
    ]
    if format == "csv":
        return _csv(series, ["start", "count", "p50", "p99"], f"latency-{granularity}")
    return {
        "since": _iso(span.first),
        "until": _iso(span.until),
        "count": count,
        "mean_ms": round(ms_sum / count, 3) if count else None,
        **{f"p{int(q * 100)}": percentile(whole, q) for q in (0.5, 0.9, 0.95, 0.99)},
        "buckets": [
            {"le": bound, "count": whole[i]} for i, bound in enumerate([*LATENCY_BOUNDS_MS, None])
        ],
        "series": series,
    }


@admin.get(
    "/applications/{app_id}/limits",
    operation_id="usage_against_limits",
    summary="An application's usage now against each limit of its plan",
)
def usage_against_limits(
    request: Request,
    reader: UsageReader,
    app_id: Annotated[str, Path(max_length=200)],
) -> Any:
    now = datetime.now(UTC).timestamp()
    with request.app.state.plane.db.session() as session:
        app = reader.application(session, app_id)
        if app is None:
            raise Problem(404, f"application {app_id!r} does not exist")
        product = session.get(Product, app.product_id)
        plan = session.get(Plan, app.plan_id)
        assert product is not None and plan is not None
        limits = session.execute(
            select(Metric.name, Limit.period, Limit.value)
            .join(Metric, Metric.id == Limit.metric_id)
            .where(Limit.plan_id == plan.id)
            .order_by(Metric.name, Limit.period)
        ).all()
        used = usage_in_periods(session, product.name, app_id, [(m, p) for m, p, _ in limits], now)
    items = []
    for metric, period, value in limits:
        start, end = window(period, now)
        usage = used[(metric, period)]
        items.append(
            {
                "metric": metric,
                "period": period,
                "limit": value,
                "usage": usage,
                "remaining": max(0, value - usage),
                "percent": round(usage * 100 / value, 2) if value else None,
                "window_start": _iso(start),
                "window_end": _iso(end) if end is not None else None,
            }
        )
    return {"application": app_id, "product": product.name, "plan": plan.name, "limits": items}


# Usage tokens: what the developer portal reads an account's usage with


@admin.post(
    "/accounts/{account_id}/tokens",
    status_code=201,
    operation_id="create_usage_token",
    summary="A token that reads one account's usage and nothing else; shown once",
)
def create_usage_token(
    request: Request,
    actor: Writer,
    account_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
) -> Any:
    token = new_token()
    with request.app.state.plane.db.writer() as session, session.begin():
        if session.get(Account, account_id) is None:
            raise Problem(404, f"account {account_id} does not exist")
        row = AdminToken(
            name=f"usage-account-{account_id}-{hash_token(token)[:12]}",
            token_hash=hash_token(token),
            scopes=["usage", f"account:{account_id}"],
        )
        session.add(row)
        session.flush()
        audit(session, actor, "create", "token", row.id, None, {"name": row.name})
        return {"id": row.id, "name": row.name, "scopes": row.scopes, "token": token}


@event.listens_for(Session, "after_flush")
def _account_deleted(session: Session, _context: Any) -> None:
    # An account's id may be given again (SQLite reuses the highest): its usage tokens go
    # with it, and its usage is no longer its, so that a new account of that id reads neither.
    for obj in session.deleted:
        if isinstance(obj, Account):
            connection = session.connection()
            tokens = connection.execute(
                select(AdminToken.id, AdminToken.scopes).where(
                    AdminToken.name.startswith(f"usage-account-{obj.id}-", autoescape=True)
                )
            ).all()
            doomed = [i for i, scopes in tokens if f"account:{obj.id}" in (scopes or [])]
            if doomed:
                connection.execute(delete(AdminToken).where(AdminToken.id.in_(doomed)))
            connection.execute(
                update(UsageRollup).where(UsageRollup.account_id == obj.id).values(account_id=None)
            )
