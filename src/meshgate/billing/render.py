"""An invoice as a PDF (fpdf2) and as CSV (one row a line, then the total)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from meshgate.billing.models import Invoice, InvoiceLine
from meshgate.billing.money import minor_unit, round_amount

__all__ = ["invoice_csv", "invoice_pdf", "money_text", "price_text"]

# A Unicode font when the system has one (Debian's fonts-dejavu-core); else the PDF core
# font, which holds Latin-1 only: other characters are written as "?".
_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def money_text(value: Decimal, currency: str) -> str:
    """``12.50`` for EUR, ``1250`` for JPY: the amount in the currency's minor unit."""
    return f"{round_amount(Decimal(value), currency):f}"


def price_text(value: Decimal, currency: str) -> str:
    """A unit price: at least the currency's decimals, more when it has them (0.0125)."""
    value = Decimal(value)
    exponent = int(minor_unit(currency).as_tuple().exponent)
    places = max(-exponent, len(f"{value.normalize():f}".partition(".")[2]))
    return f"{value.quantize(Decimal(1).scaleb(-places)):f}"


def _safe(cell: object) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula."""
    text = "" if cell is None else str(cell)
    return "'" + text if text.startswith(_FORMULA) else text


def invoice_csv(invoice: Invoice, lines: Sequence[InvoiceLine]) -> str:
    currency = invoice.currency
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        [
            "invoice",
            "period",
            "line",
            "kind",
            "description",
            "app_id",
            "plan",
            "metric",
            "from",
            "to",
            "quantity",
            "unit_price",
            "amount",
            "currency",
        ]
    )
    for line in lines:
        writer.writerow(
            _safe(cell)
            for cell in (
                invoice.number,
                invoice.period,
                line.position,
                line.kind,
                line.description,
                line.app_id,
                line.plan_name,
                line.metric or "",
                line.period_from,
                line.period_to,
                line.quantity,
                price_text(line.unit_price, currency),
                money_text(line.amount, currency),
                currency,
            )
        )
    total = money_text(invoice.total, currency)
    writer.writerow(
        _safe(c)
        for c in (invoice.number, invoice.period, "", "total", "Total", "", "", "", "", "", "")
        + ("", total, currency)
    )
    return out.getvalue()


class _Pdf(FPDF):
    def __init__(self) -> None:
        super().__init__(format="A4")
        self.unicode = False
        for directory in _FONT_DIRS:
            regular, bold = directory / "DejaVuSans.ttf", directory / "DejaVuSans-Bold.ttf"
            if regular.is_file() and bold.is_file():
                self.add_font("body", "", str(regular))
                self.add_font("body", "B", str(bold))
                self.unicode = True
                break

    def use(self, size: float, bold: bool = False) -> None:
        self.set_font("body" if self.unicode else "helvetica", "B" if bold else "", size)

    def text_of(self, value: object) -> str:
        text = "" if value is None else str(value)
        return text if self.unicode else text.encode("latin-1", "replace").decode("latin-1")

    def line_of(self, text: object, size: float = 10, bold: bool = False) -> None:
        self.use(size, bold)
        self.multi_cell(0, size * 0.5, self.text_of(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _day(value: object) -> str:
    return value.strftime("%Y-%m-%d") if hasattr(value, "strftime") else "-"


def invoice_pdf(invoice: Invoice, lines: Sequence[InvoiceLine]) -> bytes:
    """The invoice as a one-or-more-page A4 PDF."""
    currency = invoice.currency
    pdf = _Pdf()
    pdf.set_title(f"Invoice {invoice.number}")
    pdf.set_creator("meshgate")
    pdf.add_page()
    pdf.line_of(f"Invoice {invoice.number}", 18, bold=True)
    pdf.ln(2)
    if invoice.issuer_name:
        pdf.line_of(invoice.issuer_name, 11, bold=True)
    if invoice.issuer_address:
        pdf.line_of(invoice.issuer_address, 10)
    pdf.ln(4)
    pdf.line_of("Bill to", 10, bold=True)
    pdf.line_of(invoice.account_name, 11)
    if invoice.account_email:
        pdf.line_of(invoice.account_email, 10)
    pdf.ln(4)
    for label, value in (
        ("Period", invoice.period),
        ("State", invoice.state),
        ("Created", _day(invoice.created_at)),
        ("Issued", _day(invoice.issued_at)),
        ("Due", _day(invoice.due_at)),
        ("Currency", currency),
    ):
        pdf.line_of(f"{label}: {value}", 10)
    pdf.ln(4)
    pdf.use(9)
    with pdf.table(
        col_widths=(100, 22, 28, 30), text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT")
    ) as table:
        head = table.row()
        for title in ("Description", "Quantity", "Unit price", f"Amount ({currency})"):
            head.cell(title)
        for line in lines:
            row = table.row()
            row.cell(pdf.text_of(line.description))
            row.cell(str(line.quantity))
            row.cell(price_text(line.unit_price, currency))
            row.cell(money_text(line.amount, currency))
    pdf.ln(4)
    pdf.line_of(f"Total: {money_text(invoice.total, currency)} {currency}", 12, bold=True)
    if invoice.paid:
        due = Decimal(invoice.total) - Decimal(invoice.paid)
        pdf.line_of(f"Paid: {money_text(invoice.paid, currency)} {currency}", 10)
        pdf.line_of(f"Still due: {money_text(due, currency)} {currency}", 10)
    return bytes(pdf.output())
