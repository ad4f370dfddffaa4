"""Request and response bodies of the billing API. Amounts travel as decimal strings
("12.50"): JSON numbers would be floats to most clients."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from meshgate.billing.invoices import STATES
from meshgate.billing.models import BillingRun, Invoice, InvoiceLine, Payment
from meshgate.billing.money import check_currency
from meshgate.billing.periods import Month, as_utc
from meshgate.billing.render import money_text, price_text
from meshgate.control.schemas import MAX_ID, NO_NUL, Timestamp, UtcTime, storable

__all__ = [
    "InvoiceDetail",
    "InvoiceOut",
    "LineOut",
    "PaymentCreate",
    "PaymentOut",
    "PlanPeriodOut",
    "RunCreate",
    "RunOut",
    "SettingsIn",
    "SettingsOut",
    "invoice_out",
]

State = Literal["open", "finalized", "pending", "unpaid", "failed", "paid", "cancelled"]
assert set(State.__args__) == set(STATES)  # type: ignore[attr-defined]


def _period(value: str) -> str:
    return str(Month.parse(value))


def _storable(value: str) -> str:
    storable(value)
    return value


Period = Annotated[str, StringConstraints(max_length=40), AfterValidator(_period)]
Currency = Annotated[
    str, StringConstraints(min_length=3, max_length=3), AfterValidator(check_currency)
]
Line = Annotated[str, StringConstraints(max_length=200), AfterValidator(_storable)]
Address = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)]


class _In(BaseModel):
    # Strict as the rest of the admin API: "5" is not an integer. Amounts are strings.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class SettingsIn(_In):
    """Only the fields sent change."""

    currency: Currency | None = Field(None, description="ISO 4217, e.g. EUR.")
    issuer_name: Line | None = Field(None, description="Who invoices, as the PDF shows it.")
    issuer_address: Address | None = None
    billing_day: Annotated[int, Field(ge=1, le=28)] | None = Field(
        None, description="The run for month M happens on this day of M+1 at 00:00 UTC."
    )
    schedule: bool | None = Field(None, description="Run billing on the billing day.")
    due_days: Annotated[int, Field(ge=0, le=365)] | None = Field(
        None, description="Days from issue to due."
    )
    invoice_prefix: (
        Annotated[str, StringConstraints(max_length=20, pattern=r"^[A-Za-z0-9_\-]*$")] | None
    ) = Field(None, description="Put before every new invoice number: ACME-2026-00000001.")


class SettingsOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    currency: str
    issuer_name: str
    issuer_address: str
    billing_day: int
    schedule: bool
    due_days: int
    invoice_prefix: str


class RunCreate(_In):
    period: Period = Field(description="The month to bill: YYYY-MM.")
    account_id: Annotated[int, Field(ge=1, le=MAX_ID)] | None = Field(
        None, description="Only this account; every account with applications by default."
    )


class RunOut(BaseModel):
    id: int | None
    period: str
    account_id: int | None
    trigger: str
    actor: str = ""
    started_at: Timestamp
    finished_at: Timestamp | None
    accounts: int
    created: int
    updated: int
    unchanged: int
    skipped: int
    currency: str
    total: str
    invoices: list[int] | None = None

    @classmethod
    def of(cls, row: BillingRun) -> RunOut:
        return cls(
            id=row.id,
            period=row.period,
            account_id=row.account_id,
            trigger=row.trigger,
            actor=row.actor,
            started_at=row.started_at,
            finished_at=row.finished_at,
            accounts=row.accounts,
            created=row.created,
            updated=row.updated,
            unchanged=row.unchanged,
            skipped=row.skipped,
            currency=row.currency,
            total=money_text(Decimal(row.total), row.currency),
        )


# As the plans' fees: a number or a decimal string, at most what an invoice holds.
Amount = Annotated[
    Decimal, Field(gt=0, max_digits=14, decimal_places=4, strict=False, allow_inf_nan=False)
]


class PaymentCreate(_In):
    amount: Amount = Field(description='Paid, in the invoice\'s currency: "12.50".')
    currency: Currency
    reference: Line = ""
    paid_at: UtcTime | None = Field(None, description="When the money came; now by default.")


class PaymentOut(BaseModel):
    id: int
    amount: str
    currency: str
    reference: str
    paid_at: Timestamp
    created_at: Timestamp
    actor: str

    @classmethod
    def of(cls, row: Payment) -> PaymentOut:
        return cls(
            id=row.id,
            amount=money_text(row.amount, row.currency),
            currency=row.currency,
            reference=row.reference,
            paid_at=as_utc(row.paid_at),
            created_at=as_utc(row.created_at),
            actor=row.actor,
        )


class PlanPeriodOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    account_id: int
    application_id: int
    app_id: str
    application_name: str
    plan_id: int
    started_at: Timestamp
    ended_at: Timestamp | None


class LineOut(BaseModel):
    position: int
    kind: str
    description: str
    application_id: int
    app_id: str
    plan_id: int
    plan_name: str
    metric: str | None
    quantity: int
    unit_price: str
    amount: str
    period_from: str
    period_to: str


class InvoiceOut(BaseModel):
    id: int
    number: str
    account_id: int
    account_name: str
    period: str
    state: State
    currency: str
    total: str
    paid: str
    due: str
    created_at: Timestamp
    updated_at: Timestamp
    finalized_at: Timestamp | None
    issued_at: Timestamp | None
    due_at: Timestamp | None
    paid_at: Timestamp | None
    cancelled_at: Timestamp | None


class InvoiceDetail(InvoiceOut):
    account_email: str | None
    issuer_name: str
    issuer_address: str
    lines: list[LineOut]
    payments: list[PaymentOut]


def invoice_out(
    row: Invoice, lines: list[InvoiceLine] | None = None, payments: list[Payment] | None = None
) -> InvoiceOut:
    c = row.currency
    fields = {
        "id": row.id,
        "number": row.number,
        "account_id": row.account_id,
        "account_name": row.account_name,
        "period": row.period,
        "state": row.state,
        "currency": c,
        "total": money_text(row.total, c),
        "paid": money_text(row.paid, c),
        "due": money_text(Decimal(row.total) - Decimal(row.paid), c),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finalized_at": row.finalized_at,
        "issued_at": row.issued_at,
        "due_at": row.due_at,
        "paid_at": row.paid_at,
        "cancelled_at": row.cancelled_at,
    }
    if lines is None:
        return InvoiceOut.model_validate(fields)
    return InvoiceDetail.model_validate(
        {
            **fields,
            "account_email": row.account_email,
            "issuer_name": row.issuer_name,
            "issuer_address": row.issuer_address,
            "lines": [
                LineOut(
                    position=x.position,
                    kind=x.kind,
                    description=x.description,
                    application_id=x.application_id,
                    app_id=x.app_id,
                    plan_id=x.plan_id,
                    plan_name=x.plan_name,
                    metric=x.metric,
                    quantity=x.quantity,
                    unit_price=price_text(x.unit_price, c),
                    amount=money_text(x.amount, c),
                    period_from=x.period_from,
                    period_to=x.period_to,
                )
                for x in lines
            ],
            "payments": [PaymentOut.of(p) for p in payments or []],
        }
    )


QueryPeriod = Annotated[str, StringConstraints(max_length=40, pattern=NO_NUL)]
