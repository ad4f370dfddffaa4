"""The billing admin API of a real control plane: a month billed end to end from plan
changes and usage rows, invoice states, payments, PDF and CSV, and bad input."""

from __future__ import annotations

import csv
import io
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_support import ControlPlane, make_product, problem, start_control
from pypdf import PdfReader
from sqlalchemy import create_engine, text

from meshgate.billing import render
from meshgate.billing.periods import Month
from meshgate.control._db import normalize_url

NOVEMBER = "2026-11"


def sql(cp: ControlPlane, statement: str, **params: Any) -> None:
    engine = create_engine(normalize_url(cp.database_url))
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def pdf_text(body: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)


def test_a_month_billed_end_to_end(tmp_path: Path, database_url: str) -> None:
    cp = start_control(tmp_path, database_url)
    try:
        product = make_product(cp, name="shop", path_prefix="/shop")
        [hits] = cp.api.get(f"/products/{product['id']}/metrics").json()["items"]
        basic = cp.post(
            f"/products/{product['id']}/plans",
            {"name": "basic", "state": "published", "setup_fee": "10", "monthly_fee": "30"},
        )
        pro = cp.post(
            f"/products/{product['id']}/plans",
            {"name": "pro", "state": "published", "monthly_fee": "60"},
        )
        cp.post(
            f"/plans/{pro['id']}/pricing_rules",
            {"metric_id": hits["id"], "min": 1, "cost_per_unit": "0.002"},
        )
        account = cp.post("/accounts", {"name": "Zoë Müller Москва", "email": "z@example.com"})
        app = cp.post(
            "/applications", {"account_id": account["id"], "plan_id": basic["id"], "name": "web"}
        )
        cp.post(f"/applications/{app['id']}/change_plan", {"plan_id": pro["id"]})
        history = cp.api.get("/billing/plan_history", params={"application_id": app["id"]})
        assert [(p["plan_id"], p["ended_at"] is None) for p in history.json()] == [
            (basic["id"], False),
            (pro["id"], True),
        ]
        # The same history, moved to November: basic from the 1st, pro from the 16th.
        [first, second] = [p["id"] for p in history.json()]
        sql(
            cp,
            "UPDATE plan_periods SET started_at = :a, ended_at = :b WHERE id = :id",
            a=datetime(2026, 11, 1, 8, tzinfo=UTC),
            b=datetime(2026, 11, 16, 8, tzinfo=UTC),
            id=first,
        )
        sql(
            cp,
            "UPDATE plan_periods SET started_at = :a WHERE id = :id",
            a=datetime(2026, 11, 16, 8, tzinfo=UTC),
            id=second,
        )
        sql(
            cp,
            "INSERT INTO usage_rollups (granularity, product, start, application, metric, "
            "account_id, value) VALUES ('month', 'shop', :start, :app, 'hits', :acct, 1500)",
            start=Month(2026, 11).epoch,
            app=app["app_id"],
            acct=account["id"],
        )
        settings = cp.api.put(
            "/billing/settings",
            json={"currency": "USD", "issuer_name": "Meshgate Inc.", "issuer_address": "1 Loop"},
        )
        assert settings.status_code == 200 and settings.json()["currency"] == "USD"

        run = cp.post("/billing/runs", {"period": NOVEMBER, "account_id": account["id"]})
        assert {k: run[k] for k in ("accounts", "created", "unchanged", "total", "currency")} == {
            "accounts": 1,
            "created": 1,
            "unchanged": 0,
            "total": "58.00",
            "currency": "USD",
        }
        [listed] = cp.api.get("/invoices", params={"account_id": account["id"]}).json()["items"]
        invoice = cp.api.get(f"/invoices/{listed['id']}").json()
        assert (invoice["number"], invoice["state"], invoice["total"]) == (
            "2026-00000001",
            "open",
            "58.00",
        )
        assert [
            (x["kind"], x["plan_name"], x["quantity"], x["amount"]) for x in invoice["lines"]
        ] == [
            ("setup_fee", "basic", 1, "10.00"),
            ("monthly_fee", "basic", 15, "15.00"),
            ("monthly_fee", "pro", 15, "30.00"),
            ("usage", "pro", 1500, "3.00"),
        ]
        again = cp.post("/billing/runs", {"period": NOVEMBER})
        assert (again["created"], again["unchanged"], again["total"]) == (0, 1, "58.00")
        assert cp.api.get("/invoices").json()["total"] == 1

        base = f"/invoices/{invoice['id']}"
        assert cp.post(f"{base}/finalize")["state"] == "finalized"
        issued = cp.post(f"{base}/issue")
        assert issued["state"] == "pending" and issued["due_at"] > issued["issued_at"]
        partial = cp.api.post(
            f"{base}/payments", json={"amount": "20", "currency": "USD", "reference": "wire 1"}
        )
        assert partial.status_code == 201
        assert (partial.json()["state"], partial.json()["paid"], partial.json()["due"]) == (
            "pending",
            "20.00",
            "38.00",
        )
        paid = cp.post(f"{base}/payments", {"amount": 38, "currency": "USD"})
        assert (paid["state"], paid["due"], len(paid["payments"])) == ("paid", "0.00", 2)

        pdf = cp.api.get(f"{base}.pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        words = pdf_text(pdf.content)
        # Any script with DejaVu Sans (Debian's fonts-dejavu-core, which CI installs); without
        # it the PDF's core font holds Latin-1 only and writes the rest as "?".
        name = "Zoë Müller Москва" if _unicode_font() else "Zoë Müller ??????"
        for expected in ("2026-00000001", "Total: 58.00 USD", "Meshgate Inc.", name, "paid"):
            assert expected in words, (expected, words)

        body = cp.api.get(f"{base}.csv")
        assert body.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(body.text)))
        assert [r["amount"] for r in rows] == ["10.00", "15.00", "30.00", "3.00", "58.00"]
        assert rows[-1]["kind"] == "total" and rows[-1]["currency"] == "USD"
        runs = cp.api.get("/billing/runs", params={"period": NOVEMBER}).json()
        assert [r["trigger"] for r in runs["items"]][:2] == ["api", "api"]
    finally:
        cp.stop()


# The rest share one control plane on SQLite; each test bills its own accounts for the
# month in progress (applications are made today, so it has a fee to bill).


@pytest.fixture(scope="module")
def plan(control_shared: ControlPlane) -> dict[str, Any]:
    cp = control_shared
    product = make_product(cp, name="billed", path_prefix="/billed")
    return dict(
        cp.post(
            f"/products/{product['id']}/plans",
            {"name": "monthly", "state": "published", "monthly_fee": "3100"},
        )
    )


THIS_MONTH = str(Month.of(datetime.now(UTC)))


def new_invoice(cp: ControlPlane, plan: dict[str, Any], app_id: str | None = None) -> dict:  # type: ignore[type-arg]
    account = cp.post("/accounts", {"name": f"billed-{uuid.uuid4().hex[:8]}"})
    body = {"account_id": account["id"], "plan_id": plan["id"], "name": "app"}
    if app_id is not None:
        body["app_id"] = app_id
    cp.post("/applications", body)
    run = cp.post("/billing/runs", {"period": THIS_MONTH, "account_id": account["id"]})
    assert run["created"] == 1, run
    return dict(cp.api.get(f"/invoices/{run['invoices'][0]}").json())


# How to bring a fresh invoice to each state.
PATHS = {
    "open": [],
    "finalized": ["finalize"],
    "pending": ["finalize", "issue"],
    "unpaid": ["finalize", "issue", "mark_unpaid"],
    "failed": ["finalize", "issue", "fail"],
    "paid": ["finalize", "issue", "pay"],
    "cancelled": ["cancel"],
}
ALLOWED = {
    ("open", "finalize"): "finalized",
    ("open", "cancel"): "cancelled",
    ("finalized", "issue"): "pending",
    ("finalized", "cancel"): "cancelled",
    ("pending", "mark_unpaid"): "unpaid",
    ("pending", "fail"): "failed",
    ("pending", "cancel"): "cancelled",
    ("pending", "pay"): "paid",
    ("unpaid", "cancel"): "cancelled",
    ("unpaid", "pay"): "paid",
    ("failed", "pay"): "paid",
}
ACTIONS = ("finalize", "issue", "mark_unpaid", "fail", "cancel", "pay")
TARGET = {
    "finalize": "finalized",
    "issue": "pending",
    "mark_unpaid": "unpaid",
    "fail": "failed",
    "cancel": "cancelled",
}


def act(cp: ControlPlane, invoice: dict[str, Any], action: str) -> httpx.Response:
    if action == "pay":
        return cp.api.post(
            f"/invoices/{invoice['id']}/payments",
            json={"amount": invoice["total"], "currency": invoice["currency"]},
        )
    return cp.api.post(f"/invoices/{invoice['id']}/{action}")


@pytest.mark.parametrize("state", list(PATHS))
def test_every_transition_is_allowed_or_refused_as_3scale_does(
    control_shared: ControlPlane, plan: dict[str, Any], state: str
) -> None:
    cp = control_shared
    for action in ACTIONS:
        invoice = new_invoice(cp, plan)
        for step in PATHS[state]:
            assert act(cp, invoice, step).status_code in (200, 201), (state, step)
        response = act(cp, invoice, action)
        reached = ALLOWED.get((state, action))
        if reached is not None:
            assert response.status_code in (200, 201), (state, action, response.text)
            assert response.json()["state"] == reached
        elif TARGET.get(action) == state:
            # Asking for the state it is in already: answered, nothing changes.
            assert response.status_code == 200 and response.json()["state"] == state
        else:
            problem(response, 409)
        after = cp.api.get(f"/invoices/{invoice['id']}").json()["state"]
        assert after == (reached or state), (state, action)


def test_asking_for_the_state_an_invoice_is_in_changes_nothing(
    control_shared: ControlPlane, plan: dict[str, Any]
) -> None:
    cp = control_shared
    invoice = new_invoice(cp, plan)
    first = cp.post(f"/invoices/{invoice['id']}/finalize")
    second = cp.post(f"/invoices/{invoice['id']}/finalize")
    assert first["finalized_at"] == second["finalized_at"] and second["state"] == "finalized"


def test_payments_full_partial_over_wrong_currency_and_bad_amounts(
    control_shared: ControlPlane, plan: dict[str, Any]
) -> None:
    cp = control_shared
    invoice = new_invoice(cp, plan)
    url = f"/invoices/{invoice['id']}/payments"
    problem(cp.api.post(url, json={"amount": "1", "currency": "EUR"}), 409)  # still open
    cp.post(f"/invoices/{invoice['id']}/finalize")
    cp.post(f"/invoices/{invoice['id']}/issue")
    total = invoice["total"]
    bad = [
        ({"amount": "1", "currency": "USD"}, "body.currency"),
        ({"amount": "1", "currency": "usd"}, "body.currency"),
        ({"amount": "abc", "currency": "EUR"}, "body.amount"),
        ({"amount": "NaN", "currency": "EUR"}, "body.amount"),
        ({"amount": "-5", "currency": "EUR"}, "body.amount"),
        ({"amount": "0", "currency": "EUR"}, "body.amount"),
        ({"amount": "1.005", "currency": "EUR"}, "body.amount"),
        ({"amount": "1" * 40, "currency": "EUR"}, "body.amount"),
        ({"amount": "1e30", "currency": "EUR"}, "body.amount"),
        ({"amount": str(float(total) + 0.01), "currency": "EUR"}, "body.amount"),
        ({"amount": "1", "currency": "EUR", "extra": 1}, "body.extra"),
        ({"amount": "1", "currency": "EUR", "paid_at": 5}, "body.paid_at"),
        ({"currency": "EUR"}, "body.amount"),
    ]
    for body, field in bad:
        problem(cp.api.post(url, json=body), 422, field)
    problem(cp.api.post(url, content=b"{", headers={"content-type": "application/json"}), 400)
    assert cp.api.get(f"/invoices/{invoice['id']}").json()["paid"] == "0.00"

    part = cp.api.post(
        url, json={"amount": "0.01", "currency": "EUR", "paid_at": "2026-12-01T10:00:00+02:00"}
    )
    assert part.status_code == 201 and part.json()["state"] == "pending"
    assert part.json()["payments"][0]["paid_at"] == "2026-12-01T08:00:00Z"
    problem(cp.api.post(url, json={"amount": total, "currency": "EUR"}), 422, "body.amount")
    rest = cp.post(url, {"amount": part.json()["due"], "currency": "EUR"})
    assert (rest["state"], rest["paid"], rest["due"]) == ("paid", total, "0.00")
    problem(cp.api.post(url, json={"amount": "1", "currency": "EUR"}), 409)
    problem(cp.api.post("/invoices/999999/payments", json={"amount": "1", "currency": "EUR"}), 404)


def test_concurrent_payments_never_overpay(
    control_shared: ControlPlane, plan: dict[str, Any]
) -> None:
    cp = control_shared
    invoice = new_invoice(cp, plan)
    cp.post(f"/invoices/{invoice['id']}/finalize")
    cp.post(f"/invoices/{invoice['id']}/issue")
    half = f"{float(invoice['total']) / 2:.2f}"
    assert f"{float(half) * 2:.2f}" == invoice["total"]
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def pay() -> None:
        with httpx.Client(base_url=cp.api.base_url, headers=cp.api.headers, timeout=30) as c:
            barrier.wait()
            r = c.post(
                f"/invoices/{invoice['id']}/payments", json={"amount": half, "currency": "EUR"}
            )
            statuses.append(r.status_code)

    threads = [threading.Thread(target=pay) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [201, 201, 409, 409, 409, 409]
    final = cp.api.get(f"/invoices/{invoice['id']}").json()
    assert (final["state"], final["paid"], len(final["payments"])) == ("paid", invoice["total"], 2)


def test_csv_cells_never_start_a_formula(
    control_shared: ControlPlane, plan: dict[str, Any]
) -> None:
    cp = control_shared
    invoice = new_invoice(cp, plan, app_id=f"-cmd-{uuid.uuid4().hex[:6]}")
    rows = list(csv.reader(io.StringIO(cp.api.get(f"/invoices/{invoice['id']}.csv").text)))
    assert rows[1][5].startswith("'-cmd-")
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"period": "2026-13"}, "body.period"),
        ({"period": "x"}, "body.period"),
        ({"period": ""}, "body.period"),
        ({"period": "11-2026"}, "body.period"),
        ({"period": "99999-01"}, "body.period"),
        ({"period": "2026-11" * 1000}, "body.period"),
        ({"period": "2099-01"}, "body.period"),  # not begun
        ({"period": 202611}, "body.period"),
        ({"period": "2026-11", "account_id": 99_999_999}, "body.account_id"),
        ({"period": "2026-11", "account_id": "1"}, "body.account_id"),
        ({"period": "2026-11", "account_id": 2**40}, "body.account_id"),
        ({"period": "2026-11", "dry": True}, "body.dry"),
        ({}, "body.period"),
    ],
)
def test_a_run_refuses_bad_input(control_shared: ControlPlane, body: Any, field: str) -> None:
    before = control_shared.api.get("/billing/runs").json()["total"]
    problem(control_shared.api.post("/billing/runs", json=body), 422, field)
    assert control_shared.api.get("/billing/runs").json()["total"] == before


def test_reads_refuse_bad_filters_and_ids(control_shared: ControlPlane) -> None:
    api = control_shared.api
    problem(api.get("/invoices", params={"period": "2026-13"}), 422, "query.period")
    problem(api.get("/invoices", params={"state": "lost"}), 422, "query.state")
    problem(api.get("/invoices", params={"per_page": 10_000}), 422, "query.per_page")
    problem(api.get("/billing/runs", params={"period": "x"}), 422, "query.period")
    problem(api.get("/billing/plan_history"), 422)
    for path in ("/invoices/0", "/invoices/abc", f"/invoices/{2**40}", "/invoices/abc.pdf"):
        problem(api.get(path), 422)
    for path in ("/invoices/999999", "/invoices/999999.pdf", "/invoices/999999.csv"):
        problem(api.get(path), 404)
    problem(api.post("/invoices/999999/finalize"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"currency": "EUX"}, "body.currency"),
        ({"currency": "eur"}, "body.currency"),
        ({"currency": "EURO"}, "body.currency"),
        ({"billing_day": 29}, "body.billing_day"),
        ({"billing_day": 0}, "body.billing_day"),
        ({"billing_day": "5"}, "body.billing_day"),
        ({"due_days": -1}, "body.due_days"),
        ({"invoice_prefix": "=1+2"}, "body.invoice_prefix"),
        ({"invoice_prefix": "x" * 21}, "body.invoice_prefix"),
        ({"issuer_name": "a\x00b"}, "body.issuer_name"),
        ({"issuer_address": "x" * 3000}, "body.issuer_address"),
        ({"schedule": "yes"}, "body.schedule"),
        ({"colour": "red"}, "body.colour"),
    ],
)
def test_settings_refuse_bad_values(control_shared: ControlPlane, body: Any, field: str) -> None:
    before = control_shared.api.get("/billing/settings").json()
    problem(control_shared.api.put("/billing/settings", json=body), 422, field)
    assert control_shared.api.get("/billing/settings").json() == before


def test_changes_need_the_write_scope_and_reads_a_token(control_shared: ControlPlane) -> None:
    cp = control_shared
    token = cp.post("/tokens", {"name": f"reader-{uuid.uuid4().hex[:6]}", "scopes": ["read"]})
    reader = httpx.Client(
        base_url=cp.api.base_url, headers={"Authorization": f"Bearer {token['token']}"}
    )
    with reader:
        assert reader.get("/invoices").status_code == 200
        assert reader.get("/billing/settings").status_code == 200
        problem(reader.post("/billing/runs", json={"period": "2026-11"}), 403)
        problem(reader.put("/billing/settings", json={"currency": "USD"}), 403)
        problem(reader.post("/invoices/1/finalize"), 403)
    problem(httpx.get(f"{cp.url}/admin/api/invoices"), 401)
    problem(httpx.post(f"{cp.url}/admin/api/billing/runs", json={"period": "2026-11"}), 401)


def test_a_billing_run_of_every_account_at_once_over_http(
    control_shared: ControlPlane, plan: dict[str, Any]
) -> None:
    cp = control_shared
    mine = [new_invoice(cp, plan)["account_id"] for _ in range(3)]
    results: list[httpx.Response] = []

    def run() -> None:
        with httpx.Client(base_url=cp.api.base_url, headers=cp.api.headers, timeout=60) as c:
            results.append(c.post("/billing/runs", json={"period": THIS_MONTH}))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert [r.status_code for r in results] == [201, 201, 201], [r.text for r in results]
    numbers = [
        i["number"]
        for i in cp.api.get("/invoices", params={"period": THIS_MONTH, "per_page": 500}).json()[
            "items"
        ]
    ]
    assert len(numbers) == len(set(numbers))
    serials = sorted(int(n.rpartition("-")[2]) for n in numbers)
    assert serials == list(range(serials[0], serials[0] + len(serials)))
    for account in mine:
        assert cp.api.get("/invoices", params={"account_id": account}).json()["total"] == 1


def _unicode_font() -> bool:
    return any((d / "DejaVuSans.ttf").is_file() for d in render._FONT_DIRS)
