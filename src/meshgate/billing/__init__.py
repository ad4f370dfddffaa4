"""Billing in the control plane: every application's plan over time, monthly runs that
price fees and usage into invoices, their states and payments, PDF and CSV.

``billing.api.router`` is the admin API; ``billing.schedule`` the monthly run. Importing
``billing.history`` (the API does) records plan history on every plan assignment.
"""
