"""The billing settings: one row, read with defaults when it was never written."""

from __future__ import annotations

from sqlalchemy.orm import Session

from meshgate.billing.models import BillingSettings

__all__ = ["DEFAULTS", "load_settings"]

DEFAULTS = {
    "currency": "EUR",
    "issuer_name": "",
    "issuer_address": "",
    "billing_day": 1,
    "schedule": True,
    "due_days": 30,
    "invoice_prefix": "",
}


def load_settings(session: Session, for_update: bool = False) -> BillingSettings:
    """The row (added to ``session`` with the defaults when missing and ``for_update``)."""
    row = session.get(BillingSettings, 1, with_for_update=for_update or None)
    if row is None:
        row = BillingSettings(id=1, **DEFAULTS)
        if for_update:
            session.add(row)
    return row
