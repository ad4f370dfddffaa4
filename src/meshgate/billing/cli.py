"""``meshgate billing``: run billing for a month, list invoices, download one as PDF.

The commands speak to the admin API through the caller's ``call`` (the ``meshgate``
command's admin client), so that errors read as every other command's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.billing.periods import Month

__all__ = ["AdminCall", "billing_app"]

# (base URL, token, method, path, query, body, content type) -> (status, body)
AdminCall = Callable[..., tuple[int, bytes]]

Url = Annotated[
    str,
    typer.Option(
        "--control-plane",
        "--url",
        envvar="MESHGATE_CONTROL_PLANE_URL",
        help="The control plane's URL.",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(envvar="MESHGATE_ADMIN_TOKEN", help="An admin token (write scope to run)."),
]


def billing_app(call: AdminCall, default_url: str) -> typer.Typer:
    app = typer.Typer(
        help="Billing: monthly runs, invoices, PDFs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    def get(url: str, token: str | None, path: str, **params: Any) -> Any:
        query = {k: str(v) for k, v in params.items() if v is not None}
        return json.loads(call(url, token, "GET", path, query)[1])

    def post(url: str, token: str | None, path: str, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode()
        return json.loads(call(url, token, "POST", path, None, data, "application/json")[1])

    def account_ids(url: str, token: str | None) -> list[int]:
        ids: list[int] = []
        page = 1
        while True:
            result = get(url, token, "/accounts", page=page, per_page=500)
            ids += [a["id"] for a in result["items"]]
            if page * 500 >= result["total"]:
                return ids
            page += 1

    @app.command()
    def run(
        month: Annotated[str, typer.Option(help="The month to bill: YYYY-MM.")],
        account: Annotated[
            int | None, typer.Option(help="Only this account's id; every account by default.")
        ] = None,
        control_plane: Url = default_url,
        token: Token = None,
    ) -> None:
        """Bill a month: make or update each account's open invoice (a second run of the
        same month changes nothing). A progress bar on stderr moves account by account."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        try:
            month = str(Month.parse(month))
        except ValueError as exc:
            typer.echo(f"error: --month: {exc}", err=True)
            raise typer.Exit(1) from None
        ids = [account] if account is not None else account_ids(control_plane, token)
        counts = dict.fromkeys(("created", "updated", "unchanged", "skipped"), 0)
        totals: dict[str, Decimal] = {}
        with Progress(
            TextColumn("billing {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as progress:
            task = progress.add_task(month, total=len(ids))
            for account_id in ids:
                summary = post(
                    control_plane,
                    token,
                    "/billing/runs",
                    {"period": month, "account_id": account_id},
                )
                for key in counts:
                    counts[key] += summary[key]
                currency = summary["currency"]
                totals[currency] = totals.get(currency, Decimal(0)) + Decimal(summary["total"])
                progress.advance(task)
        money = ", ".join(f"{amount} {currency}" for currency, amount in totals.items())
        typer.echo(
            f"{month}: {len(ids)} accounts, {counts['created']} invoices made, "
            f"{counts['updated']} updated, {counts['unchanged']} unchanged, "
            f"{counts['skipped']} with nothing to bill; total {money or '0'}"
        )

    @app.command()
    def invoices(
        month: Annotated[str | None, typer.Option(help="Only this month: YYYY-MM.")] = None,
        account: Annotated[int | None, typer.Option(help="Only this account's id.")] = None,
        state: Annotated[str | None, typer.Option(help="Only invoices in this state.")] = None,
        control_plane: Url = default_url,
        token: Token = None,
    ) -> None:
        """The invoices as a table, newest month first."""
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "number", "account", "period", "state", "total", "due", "currency")
        page = 1
        while True:
            result = get(
                control_plane,
                token,
                "/invoices",
                period=month,
                account_id=account,
                state=state,
                page=page,
                per_page=500,
            )
            for i in result["items"]:
                table.add_row(
                    str(i["id"]),
                    i["number"],
                    f"{i['account_name']} ({i['account_id']})",
                    i["period"],
                    i["state"],
                    i["total"],
                    i["due"],
                    i["currency"],
                )
            if page * 500 >= result["total"]:
                break
            page += 1
        Console(width=200).print(table)

    @app.command()
    def pdf(
        invoice: Annotated[int, typer.Argument(help="The invoice's id.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Write the PDF here.")],
        control_plane: Url = default_url,
        token: Token = None,
    ) -> None:
        """Download an invoice as a PDF."""
        _, body = call(control_plane, token, "GET", f"/invoices/{invoice}.pdf", None)
        try:
            output.write_bytes(body)
        except OSError as exc:
            typer.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {output} ({len(body)} bytes)", err=True)

    return app
