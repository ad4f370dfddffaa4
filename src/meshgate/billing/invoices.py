"""Invoices after a run: reading them (for an admin, or one account), their states as 3scale
has them, and payments recorded by hand.

    open ─finalize─▶ finalized ─issue─▶ pending ─pay─▶ paid
                                          ├─mark_unpaid─▶ unpaid ─pay─▶ paid
                                          └─fail─▶ failed ─pay─▶ paid
    open, finalized, pending, unpaid ─cancel─▶ cancelled
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meshgate.billing.history import now
from meshgate.billing.models import Invoice, InvoiceLine, Payment
from meshgate.billing.money import minor_unit
from meshgate.billing.settings import load_settings

__all__ = [
    "ACTIONS",
    "PAYABLE",
    "STATES",
    "InvoiceConflict",
    "InvoiceNotFound",
    "PaymentIn",
    "PaymentRefused",
    "change_state",
    "get_invoice",
    "invoice_lines",
    "invoice_payments",
    "list_invoices",
    "record_payment",
]

STATES = ("open", "finalized", "pending", "unpaid", "failed", "paid", "cancelled")
# action: (the states it leaves, the state it reaches)
ACTIONS: dict[str, tuple[frozenset[str], str]] = {
    "finalize": (frozenset({"open"}), "finalized"),
    "issue": (frozenset({"finalized"}), "pending"),
    "mark_unpaid": (frozenset({"pending"}), "unpaid"),
    "fail": (frozenset({"pending"}), "failed"),
    "cancel": (frozenset({"open", "finalized", "pending", "unpaid"}), "cancelled"),
}
PAYABLE = frozenset({"pending", "unpaid", "failed"})


class InvoiceNotFound(LookupError):
    pass


class InvoiceConflict(Exception):
    """The invoice's state does not allow what was asked."""


class PaymentRefused(ValueError):
    """The payment itself is wrong: ``field`` says which part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def get_invoice(
    session: Session, invoice_id: int, account_id: int | None = None, lock: bool = False
) -> Invoice:
    """The invoice (of ``account_id`` when given: another account's is not found)."""
    query = select(Invoice).where(Invoice.id == invoice_id)
    if account_id is not None:
        query = query.where(Invoice.account_id == account_id)
    if lock:
        query = query.with_for_update()
    invoice = session.scalars(query).one_or_none()
    if invoice is None:
        raise InvoiceNotFound(f"invoice {invoice_id} does not exist")
    return invoice


def list_invoices(
    session: Session,
    *,
    account_id: int | None = None,
    period: str | None = None,
    state: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> tuple[list[Invoice], int]:
    """One page of invoices, newest period first, and how many match in all."""
    query = select(Invoice)
    for column, value in (
        (Invoice.account_id, account_id),
        (Invoice.period, period),
        (Invoice.state, state),
    ):
        if value is not None:
            query = query.where(column == value)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Invoice.period.desc(), Invoice.id)
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    return list(rows), total


def invoice_lines(session: Session, invoice_id: int) -> list[InvoiceLine]:
    return list(
        session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == invoice_id)
            .order_by(InvoiceLine.position)
        )
    )


def invoice_payments(session: Session, invoice_id: int) -> list[Payment]:
    return list(
        session.scalars(
            select(Payment).where(Payment.invoice_id == invoice_id).order_by(Payment.id)
        )
    )


def change_state(session: Session, invoice_id: int, action: str) -> tuple[Invoice, bool]:
    """Apply ``action``; the invoice and whether it changed (asking for the state it is
    already in changes nothing). InvoiceConflict when the state does not allow it."""
    leaves, reaches = ACTIONS[action]
    invoice = get_invoice(session, invoice_id, lock=True)
    if invoice.state == reaches:
        return invoice, False
    if invoice.state not in leaves:
        allowed = ", ".join(sorted(leaves))
        raise InvoiceConflict(
            f"a {invoice.state} invoice cannot be {_PAST[action]} (only {allowed} ones)"
        )
    at = now()
    invoice.state = reaches
    if reaches == "finalized":
        invoice.finalized_at = at
    elif reaches == "pending":
        invoice.issued_at = at
        invoice.due_at = at + timedelta(days=load_settings(session).due_days)
    elif reaches == "cancelled":
        invoice.cancelled_at = at
    return invoice, True


_PAST = {
    "finalize": "finalized",
    "issue": "issued",
    "mark_unpaid": "marked unpaid",
    "fail": "marked failed",
    "cancel": "cancelled",
}


@dataclass(frozen=True)
class PaymentIn:
    amount: Decimal
    currency: str
    reference: str
    paid_at: datetime | None


def record_payment(
    session: Session, invoice_id: int, payment: PaymentIn, actor: str
) -> tuple[Invoice, Payment]:
    """Record money received: a payment of what is due makes the invoice paid, a smaller
    one is kept and the invoice waits for the rest; more than is due is refused."""
    invoice = get_invoice(session, invoice_id, lock=True)
    if invoice.state not in PAYABLE:
        raise InvoiceConflict(
            f"a {invoice.state} invoice takes no payment: issue it first (pending, unpaid "
            "or failed invoices do)"
        )
    if payment.currency != invoice.currency:
        raise PaymentRefused(
            "currency", f"the invoice is in {invoice.currency}, not {payment.currency}"
        )
    unit = minor_unit(invoice.currency)
    if payment.amount <= 0 or payment.amount != payment.amount.quantize(unit):
        raise PaymentRefused(
            "amount", f"must be a positive amount of {invoice.currency} in steps of {unit}"
        )
    due = Decimal(invoice.total) - Decimal(invoice.paid)
    if payment.amount > due:
        raise PaymentRefused(
            "amount", f"{payment.amount} overpays the invoice: {due} {invoice.currency} is due"
        )
    paid_at = payment.paid_at or now()
    row = Payment(
        invoice_id=invoice.id,
        amount=payment.amount,
        currency=payment.currency,
        reference=payment.reference,
        paid_at=paid_at,
        actor=actor,
    )
    session.add(row)
    invoice.paid = Decimal(invoice.paid) + payment.amount
    if invoice.paid == Decimal(invoice.total):
        invoice.state = "paid"
        invoice.paid_at = paid_at
    session.flush()
    return invoice, row
