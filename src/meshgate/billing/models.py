"""Billing's tables: plan history, settings, invoices with their lines and payments, the
per-year invoice counter and the log of billing runs."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from meshgate.control.models import Base, Money, utcnow

__all__ = [
    "Amount",
    "BillingRun",
    "BillingSettings",
    "Invoice",
    "InvoiceCounter",
    "InvoiceLine",
    "Payment",
    "PlanPeriod",
]

# As the plans' fees: 14 digits, 4 decimals, exact on PostgreSQL and on SQLite (whose
# NUMERIC is a double: 14 digits come back as they went in, more would not).
Amount = Money


class PlanPeriod(Base):
    """An application on one plan from ``started_at`` until ``ended_at`` (open: still on it).

    No foreign key to the application or the plan: a deleted application's month is still
    billed for the days it lived, and a plan deleted later still names its past periods.
    """

    __tablename__ = "plan_periods"
    __table_args__ = (Index("ix_plan_periods_application", "application_id", "started_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    application_id: Mapped[int] = mapped_column(Integer)
    app_id: Mapped[str] = mapped_column(String(200))
    application_name: Mapped[str] = mapped_column(String(200))
    plan_id: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BillingSettings(Base):
    """The one row of billing settings (id 1)."""

    __tablename__ = "billing_settings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    issuer_name: Mapped[str] = mapped_column(String(200), default="")
    issuer_address: Mapped[str] = mapped_column(Text, default="")
    # The run for month M happens on this day of M+1 at 00:00 UTC.
    billing_day: Mapped[int] = mapped_column(Integer, default=1)
    schedule: Mapped[bool] = mapped_column(Boolean, default=True)
    due_days: Mapped[int] = mapped_column(Integer, default=30)
    invoice_prefix: Mapped[str] = mapped_column(String(20), default="")
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Invoice(Base):
    """One account's invoice for one month."""

    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("account_id", "period"),
        Index("ix_invoices_period_state", "period", "state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    period: Mapped[str] = mapped_column(String(7))  # YYYY-MM
    number: Mapped[str] = mapped_column(String(40), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="open")
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[Decimal] = mapped_column(Amount, default=Decimal(0))
    paid: Mapped[Decimal] = mapped_column(Amount, default=Decimal(0))
    # As the invoice was made: later renames of the account or the issuer do not reach it.
    account_name: Mapped[str] = mapped_column(String(200))
    account_email: Mapped[str | None] = mapped_column(String(320))
    issuer_name: Mapped[str] = mapped_column(String(200), default="")
    issuer_address: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    issued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InvoiceLine(Base):
    """One charge: a fee for some days of a plan, a setup fee, or one tier of a metric's usage."""

    __tablename__ = "invoice_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    invoice_id: Mapped[int] = mapped_column(
        ForeignKey("invoices.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # setup_fee, monthly_fee, usage
    description: Mapped[str] = mapped_column(String(500))
    application_id: Mapped[int] = mapped_column(Integer)
    app_id: Mapped[str] = mapped_column(String(200))
    plan_id: Mapped[int] = mapped_column(Integer)
    plan_name: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str | None] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(BigInteger)
    unit_price: Mapped[Decimal] = mapped_column(Amount)
    amount: Mapped[Decimal] = mapped_column(Amount)
    period_from: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, inclusive
    period_to: Mapped[str] = mapped_column(String(10))


class Payment(Base):
    """Money received for an invoice (recorded by an admin: no provider is reached)."""

    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    invoice_id: Mapped[int] = mapped_column(
        ForeignKey("invoices.id", ondelete="CASCADE"), index=True
    )
    amount: Mapped[Decimal] = mapped_column(Amount)
    currency: Mapped[str] = mapped_column(String(3))
    reference: Mapped[str] = mapped_column(String(200), default="")
    paid_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200), default="")


class InvoiceCounter(Base):
    """The last invoice number of a year, locked by whoever assigns the next one."""

    __tablename__ = "invoice_counters"
    year: Mapped[int] = mapped_column(Integer, primary_key=True)
    last: Mapped[int] = mapped_column(Integer, default=0)


class BillingRun(Base):
    """One billing run: what it was asked and what it did."""

    __tablename__ = "billing_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    period: Mapped[str] = mapped_column(String(7), index=True)
    account_id: Mapped[int | None] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))  # api, schedule
    actor: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    accounts: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    currency: Mapped[str] = mapped_column(String(3))
    # As text: a run's sum over thousands of invoices may pass what Amount holds exactly.
    total: Mapped[str] = mapped_column(String(40), default="0")
