"""The billing admin API: settings, runs, invoices with their states, payments, PDF and CSV."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy import func, select

from meshgate.billing import invoices as inv
from meshgate.billing import schemas as bs
from meshgate.billing.models import BillingRun, PlanPeriod
from meshgate.billing.periods import Month
from meshgate.billing.render import invoice_csv, invoice_pdf, money_text
from meshgate.billing.runs import (
    BillingError,
    MonthNotBegun,
    RunSummary,
    UnknownAccount,
    run_billing,
)
from meshgate.billing.settings import load_settings
from meshgate.control._auth import Reader, Writer
from meshgate.control._crud import audit
from meshgate.control._problems import Problem
from meshgate.control.schemas import MAX_ID, Page

__all__ = ["router"]

router = APIRouter(tags=["billing"])
InvoiceId = Path(ge=1, le=MAX_ID, description="The invoice's id.")
PageNo = Query(1, ge=1, le=1_000_000)
PerPage = Query(50, ge=1, le=500)


def _db(request: Request) -> Any:
    return request.app.state.plane.db


def _month(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        return str(Month.parse(value))
    except ValueError as exc:
        raise Problem(422, f"period: {exc}", field=field) from None


@router.get(
    "/billing/settings",
    response_model=bs.SettingsOut,
    operation_id="read_billing_settings",
    summary="Currency, issuer, billing day, due days, invoice prefix",
)
def read_settings(request: Request, _actor: Reader) -> Any:
    with _db(request).session() as session:
        return bs.SettingsOut.model_validate(load_settings(session))


@router.put(
    "/billing/settings",
    response_model=bs.SettingsOut,
    operation_id="update_billing_settings",
    summary="Change billing settings (the fields sent); invoices already made keep theirs",
)
def update_settings(request: Request, actor: Writer, body: bs.SettingsIn) -> Any:
    with _db(request).writer() as session, session.begin():
        row = load_settings(session, for_update=True)
        before = bs.SettingsOut.model_validate(row).model_dump()
        for key, value in body.model_dump(exclude_none=True).items():
            setattr(row, key, value)
        session.flush()
        after = bs.SettingsOut.model_validate(row).model_dump()
        if after != before:
            audit(session, actor, "update", "billing_settings", 1, before, after)
        return bs.SettingsOut.model_validate(row)


def _run_out(summary: RunSummary, actor: str) -> bs.RunOut:
    return bs.RunOut(
        id=summary.id,
        period=summary.period,
        account_id=summary.account_id,
        trigger=summary.trigger,
        actor=actor,
        started_at=summary.started_at,
        finished_at=summary.finished_at,
        accounts=summary.accounts,
        created=summary.created,
        updated=summary.updated,
        unchanged=summary.unchanged,
        skipped=summary.skipped,
        currency=summary.currency,
        total=money_text(summary.total, summary.currency),
        invoices=summary.invoices,
    )


@router.post(
    "/billing/runs",
    status_code=201,
    response_model=bs.RunOut,
    operation_id="run_billing",
    summary="Bill a month for one account or all: makes or updates open invoices",
)
def create_run(request: Request, actor: Writer, body: bs.RunCreate) -> Any:
    db = _db(request)
    try:
        summary = run_billing(db, Month.parse(body.period), body.account_id, "api", actor.name)
    except UnknownAccount as exc:
        raise Problem(422, f"account_id: {exc}", field="body.account_id") from None
    except MonthNotBegun as exc:
        raise Problem(422, f"period: {exc}", field="body.period") from None
    except BillingError as exc:
        raise Problem(422, str(exc)) from None
    out = _run_out(summary, actor.name)
    with db.writer() as session, session.begin():
        audit(session, actor, "run", "billing_run", summary.id, None, out.model_dump(mode="json"))
    return out


@router.get(
    "/billing/runs",
    response_model=Page[bs.RunOut],
    operation_id="list_billing_runs",
    summary="Billing runs, newest first",
)
def list_runs(
    request: Request,
    _actor: Reader,
    period: str | None = Query(None, max_length=40),
    page: int = PageNo,
    per_page: int = PerPage,
) -> Any:
    month = _month(period, "query.period")
    with _db(request).session() as session:
        query = select(BillingRun)
        if month is not None:
            query = query.where(BillingRun.period == month)
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(BillingRun.id.desc()).offset((page - 1) * per_page).limit(per_page)
        ).all()
        items = [bs.RunOut.of(r) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}


@router.get(
    "/billing/plan_history",
    response_model=list[bs.PlanPeriodOut],
    operation_id="list_plan_history",
    summary="Applications' plans over time, as billing prorates them",
)
def plan_history(
    request: Request,
    _actor: Reader,
    application_id: int | None = Query(None, ge=1, le=MAX_ID),
    account_id: int | None = Query(None, ge=1, le=MAX_ID),
) -> Any:
    if application_id is None and account_id is None:
        raise Problem(422, "give application_id or account_id", field="query.application_id")
    with _db(request).session() as session:
        query = select(PlanPeriod)
        if application_id is not None:
            query = query.where(PlanPeriod.application_id == application_id)
        if account_id is not None:
            query = query.where(PlanPeriod.account_id == account_id)
        rows = session.scalars(query.order_by(PlanPeriod.id).limit(10_000)).all()
        return [bs.PlanPeriodOut.model_validate(r) for r in rows]


@router.get(
    "/invoices",
    response_model=Page[bs.InvoiceOut],
    operation_id="list_invoices",
    summary="Invoices, newest period first",
)
def list_invoices(
    request: Request,
    _actor: Reader,
    account_id: int | None = Query(None, ge=1, le=MAX_ID),
    period: str | None = Query(None, max_length=40),
    state: bs.State | None = Query(None),
    page: int = PageNo,
    per_page: int = PerPage,
) -> Any:
    month = _month(period, "query.period")
    with _db(request).session() as session:
        rows, total = inv.list_invoices(
            session,
            account_id=account_id,
            period=month,
            state=state,
            page=page,
            per_page=per_page,
        )
        items = [bs.invoice_out(r) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total}


def _read(request: Request, invoice_id: int) -> tuple[Any, list[Any], list[Any]]:
    with _db(request).session() as session:
        try:
            row = inv.get_invoice(session, invoice_id)
        except inv.InvoiceNotFound as exc:
            raise Problem(404, str(exc)) from None
        return row, inv.invoice_lines(session, row.id), inv.invoice_payments(session, row.id)


# Before /invoices/{id}: that path would take "7.pdf" as an id and refuse it.
@router.get(
    "/invoices/{invoice_id}.pdf",
    operation_id="read_invoice_pdf",
    summary="The invoice as a PDF",
    response_class=Response,
    responses={200: {"content": {"application/pdf": {}}}},
)
def read_pdf(request: Request, _actor: Reader, invoice_id: int = InvoiceId) -> Response:
    row, lines, _ = _read(request, invoice_id)
    return Response(
        invoice_pdf(row, lines),
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="invoice-{row.number}.pdf"'},
    )


@router.get(
    "/invoices/{invoice_id}.csv",
    operation_id="read_invoice_csv",
    summary="The invoice's lines and total as CSV",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
def read_csv(request: Request, _actor: Reader, invoice_id: int = InvoiceId) -> Response:
    row, lines, _ = _read(request, invoice_id)
    return Response(
        invoice_csv(row, lines),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="invoice-{row.number}.csv"'},
    )


@router.get(
    "/invoices/{invoice_id}",
    response_model=bs.InvoiceDetail,
    operation_id="read_invoice",
    summary="An invoice with its lines and payments",
)
def read_invoice(request: Request, _actor: Reader, invoice_id: int = InvoiceId) -> Any:
    row, lines, payments = _read(request, invoice_id)
    return bs.invoice_out(row, lines, payments)


def _act(request: Request, actor: Any, invoice_id: int, action: str) -> Any:
    with _db(request).writer() as session, session.begin():
        try:
            before = inv.get_invoice(session, invoice_id, lock=True).state
            row, changed = inv.change_state(session, invoice_id, action)
        except inv.InvoiceNotFound as exc:
            raise Problem(404, str(exc)) from None
        except inv.InvoiceConflict as exc:
            raise Problem(409, str(exc)) from None
        session.flush()
        if changed:
            audit(
                session, actor, action, "invoice", row.id, {"state": before}, {"state": row.state}
            )
        return bs.invoice_out(
            row, inv.invoice_lines(session, row.id), inv.invoice_payments(session, row.id)
        )


def _action_route(action: str, summary: str) -> None:
    def act(request: Request, actor: Writer, invoice_id: int = InvoiceId) -> Any:
        return _act(request, actor, invoice_id, action)

    router.add_api_route(
        f"/invoices/{{invoice_id}}/{action}",
        act,
        methods=["POST"],
        response_model=bs.InvoiceDetail,
        operation_id=f"{action}_invoice",
        summary=summary,
        responses={409: {"description": "The invoice's state does not allow it"}},
    )


for _action, _summary in (
    ("finalize", "Finalize an open invoice: no run changes it any more"),
    ("issue", "Issue a finalized invoice to the account: it is pending payment, with a due date"),
    ("mark_unpaid", "Mark a pending invoice unpaid (overdue)"),
    ("fail", "Mark a pending invoice failed (a charge did not go through)"),
    ("cancel", "Cancel an open, finalized, pending or unpaid invoice"),
):
    _action_route(_action, _summary)


@router.post(
    "/invoices/{invoice_id}/payments",
    status_code=201,
    response_model=bs.InvoiceDetail,
    operation_id="record_invoice_payment",
    summary="Record a payment: what is due makes the invoice paid, less is kept as partial",
    responses={409: {"description": "The invoice takes no payment in its state"}},
)
def record_payment(
    request: Request, actor: Writer, body: bs.PaymentCreate, invoice_id: int = InvoiceId
) -> Any:
    payment = inv.PaymentIn(body.amount, body.currency, body.reference, body.paid_at)
    with _db(request).writer() as session, session.begin():
        try:
            row, paid = inv.record_payment(session, invoice_id, payment, actor.name)
        except inv.InvoiceNotFound as exc:
            raise Problem(404, str(exc)) from None
        except inv.InvoiceConflict as exc:
            raise Problem(409, str(exc)) from None
        except inv.PaymentRefused as exc:
            raise Problem(422, f"{exc.field}: {exc}", field=f"body.{exc.field}") from None
        audit(
            session,
            actor,
            "pay",
            "invoice",
            row.id,
            None,
            {**bs.PaymentOut.of(paid).model_dump(mode="json"), "state": row.state},
        )
        return bs.invoice_out(
            row, inv.invoice_lines(session, row.id), inv.invoice_payments(session, row.id)
        )


@router.get(
    "/invoices/{invoice_id}/payments",
    response_model=list[bs.PaymentOut],
    operation_id="list_invoice_payments",
    summary="The payments recorded for an invoice",
)
def list_payments(request: Request, _actor: Reader, invoice_id: int = InvoiceId) -> Any:
    _, _, payments = _read(request, invoice_id)
    return [bs.PaymentOut.of(p) for p in payments]
