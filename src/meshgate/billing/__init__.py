"""Billing in the control plane: every application's plan over time, monthly runs that
price fees and usage into invoices, their states and payments, PDF and CSV.

Importing this package records plan history on every plan assignment (see ``history``).
"""

from meshgate.billing import history as history
from meshgate.billing.api import router as router
from meshgate.billing.charges import charges as charges
from meshgate.billing.periods import Month as Month
from meshgate.billing.runs import run_billing as run_billing

__all__ = ["Month", "charges", "history", "router", "run_billing"]
