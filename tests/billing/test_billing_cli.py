"""``meshgate billing``: a month run account by account with a progress bar, the invoices
as a table, an invoice as a PDF; bad input is one line and exit 1."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_support import ControlPlane, make_product
from pypdf import PdfReader

from meshgate.billing.periods import Month

THIS_MONTH = str(Month.of(datetime.now(UTC)))


def meshgate(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgate", "billing", *args, "--url", cp.url, "--token", cp.token],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_list_and_download(control_shared: ControlPlane, tmp_path: Path) -> None:
    cp = control_shared
    product = make_product(cp, name="cli", path_prefix="/cli")
    plan = cp.post(
        f"/products/{product['id']}/plans",
        {"name": "monthly", "state": "published", "monthly_fee": "310"},
    )
    accounts: list[dict[str, Any]] = []
    for _ in range(3):
        account = cp.post("/accounts", {"name": f"cli-{uuid.uuid4().hex[:8]}"})
        cp.post("/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "a"})
        accounts.append(account)
    idle = cp.post("/accounts", {"name": f"idle-{uuid.uuid4().hex[:8]}"})

    first = meshgate(cp, "run", "--month", THIS_MONTH)
    assert first.returncode == 0, first.stderr
    assert f"billing {THIS_MONTH}" in first.stderr and "4/4" in first.stderr
    assert f"{THIS_MONTH}: 4 accounts, 3 invoices made, 0 updated, 0 unchanged, 1 with " in (
        first.stdout
    )
    second = meshgate(cp, "run", "--month", THIS_MONTH, "--account", str(accounts[0]["id"]))
    assert "1 accounts, 0 invoices made, 0 updated, 1 unchanged" in second.stdout

    table = meshgate(cp, "invoices", "--month", THIS_MONTH)
    assert table.returncode == 0, table.stderr
    for account in accounts:
        assert account["name"] in table.stdout
    assert idle["name"] not in table.stdout
    invoice = cp.api.get("/invoices", params={"account_id": accounts[0]["id"]}).json()["items"][0]
    assert invoice["number"] in table.stdout

    target = tmp_path / "invoice.pdf"
    saved = meshgate(cp, "pdf", str(invoice["id"]), "-o", str(target))
    assert saved.returncode == 0, saved.stderr
    words = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(target.read_bytes())).pages)
    assert invoice["number"] in words and f"Total: {invoice['total']} EUR" in words


def test_bad_input_is_one_line_and_exit_1(control_shared: ControlPlane, tmp_path: Path) -> None:
    cp = control_shared
    for args, message in [
        (("run", "--month", "2026-13"), "the month must be 01 to 12"),
        (("run", "--month", "x"), "is not a month"),
        (("run", "--month", "2026-11", "--account", "99999999"), "does not exist"),
        (("pdf", "99999999", "-o", str(tmp_path / "x.pdf")), "does not exist"),
        (("invoices", "--state", "lost"), "HTTP 422"),
    ]:
        result = meshgate(cp, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "x.pdf").exists()
