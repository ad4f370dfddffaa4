"""``meshgate integration``: run and validate route files."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# The runtime is imported when a command runs, not whenever `meshgate` starts.
if TYPE_CHECKING:
    from meshgate.integration._admin import AdminListener
    from meshgate.integration._context import IntegrationContext
    from meshgate.integration._reload import RoutesReloader
    from meshgate.integration._yaml import RoutesFile
    from meshgate.telemetry.tracing import Tracing

__all__ = ["app"]

app = typer.Typer(
    help="Integration routes: enterprise integration patterns over HTTP and brokers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _load(file: Path, http_listen: str | None = None) -> tuple[RoutesFile, IntegrationContext]:
    from meshgate.integration._context import IntegrationContext
    from meshgate.integration._yaml import load_routes

    settings = {"http_listen": http_listen} if http_listen else {}
    context = IntegrationContext(settings=settings)
    routes = load_routes(file, context=context)
    context.settings = {**routes.settings, **settings}
    context.error_handler = routes.error_handler
    return routes, context


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="The routes file (YAML or JSON).")]) -> None:
    """Check a routes file; print every error with its path."""
    from meshgate.integration._errors import DefinitionError

    try:
        routes, _ = _load(file)
    except DefinitionError as exc:
        for error in exc.errors:
            typer.echo(error, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: {len(routes.routes)} route(s), valid")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="The routes file (YAML or JSON).")],
    http_listen: Annotated[
        str | None, typer.Option(help="Where http: consumers are served (host:port).")
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds in-flight exchanges get to finish on SIGTERM (and on a reload);"
            " those still running then are left unacknowledged, for the broker to redeliver.",
        ),
    ] = 10.0,
    admin_listen: Annotated[
        str | None,
        typer.Option(help="Serve /metrics, /healthz and /routes (start, stop, suspend) here."),
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Reload the routes whose definition changed when the file does.")
    ] = True,
    tracing_endpoint: Annotated[
        str | None,
        typer.Option(help="Turn tracing on, exporting spans to this OTLP/HTTP collector URL."),
    ] = None,
    trace_sample_rate: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Turn tracing on, sampling this share of new traces."),
    ] = None,
) -> None:
    """Run the routes of a file until SIGTERM or SIGINT."""
    from meshgate.integration._admin import AdminListener
    from meshgate.integration._errors import DefinitionError, EndpointError
    from meshgate.integration._reload import RoutesReloader

    logging.basicConfig(
        level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        routes, context = _load(file, http_listen)
        context.tracing = _tracing(routes, tracing_endpoint, trace_sample_rate)
        context.add_routes(routes.routes)
        overrides = {"http_listen": http_listen} if http_listen else {}
        reloader = (
            RoutesReloader(context, file, overrides=overrides, grace=grace) if watch else None
        )
        admin = (
            AdminListener(context, admin_listen, grace=grace, reloader=reloader)
            if admin_listen
            else None
        )
    except (DefinitionError, EndpointError) as exc:
        raise _fail(str(exc)) from None
    import uvloop

    try:
        code = uvloop.run(_serve(context, grace, admin, reloader))
    except KeyboardInterrupt:
        code = 0
    finally:
        if context.tracing is not None:
            context.tracing.shutdown()
    raise typer.Exit(code)


def _tracing(routes: RoutesFile, endpoint: str | None, rate: float | None) -> Tracing | None:
    """The runtime's tracer: the file's ``tracing`` section, the flags over it (either flag
    turns tracing on)."""
    from meshgate.config.tracing import with_flags
    from meshgate.integration._errors import DefinitionError
    from meshgate.telemetry.tracing import Tracing

    flags: dict[str, object] = {}
    if endpoint is not None:
        flags.update(enabled=True, endpoint=endpoint)
    if rate is not None:
        flags.update(enabled=True, sample_rate=rate)
    try:
        settings = with_flags(routes.tracing, flags)
    except ValueError as exc:
        raise DefinitionError([str(exc)]) from None
    return Tracing.start(settings, "meshgate-integration")


async def _serve(
    context: IntegrationContext,
    grace: float,
    admin: AdminListener | None,
    reloader: RoutesReloader | None,
) -> int:
    from meshgate.integration._context import RouteStartError
    from meshgate.integration._errors import EndpointError

    stopping, forced = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # The first signal drains; a second one cuts the drain short.
        loop.add_signal_handler(sig, lambda: (forced if stopping.is_set() else stopping).set())
    if admin is not None:
        try:
            await admin.start()
        except EndpointError as exc:
            typer.echo(f"error: {exc}", err=True)
            return 1
        typer.echo(f"admin API on {admin.url} (/metrics, /healthz, /routes)", err=True)
    try:
        await context.start()
    except RouteStartError as exc:
        for route_id, cause in exc.failures.items():
            typer.echo(f"error: route {route_id!r} failed to start: {cause}", err=True)
        if all(context.route_status(r.id) != "started" for r in context.routes):
            await context.stop(grace)
            if admin is not None:
                await admin.stop()
            return 1
    started = [r.id for r in context.routes if context.route_status(r.id) == "started"]
    typer.echo(f"integration routes started: {', '.join(started)}", err=True)
    watching = None
    if reloader is not None:
        watching = loop.create_task(reloader.watch())
        loop.add_signal_handler(signal.SIGHUP, lambda: context.background(reloader.reload()))
    await stopping.wait()
    typer.echo(
        f"stopping: draining in-flight exchanges (up to {grace:g}s; signal again to force)",
        err=True,
    )
    if watching is not None:
        watching.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
    return await _drain(context, grace, forced, admin)


async def _drain(
    context: IntegrationContext, grace: float, forced: asyncio.Event, admin: AdminListener | None
) -> int:
    """Stop the context; 0 when every exchange in flight finished and was acknowledged."""
    stopping = asyncio.ensure_future(context.stop(grace))
    forcing = asyncio.ensure_future(forced.wait())
    await asyncio.wait({stopping, forcing}, return_when=asyncio.FIRST_COMPLETED)
    forcing.cancel()
    if not stopping.done():
        # Exchanges in flight are cancelled unacknowledged; the brokers redeliver them.
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        typer.echo("error: forced to stop; unfinished exchanges were not acknowledged", err=True)
        return 1
    drained = stopping.result()
    if admin is not None:
        await admin.stop()
    if not drained:
        typer.echo(
            f"error: in-flight exchanges did not finish within {grace:g}s;"
            " they were not acknowledged",
            err=True,
        )
        return 1
    typer.echo("stopped: every in-flight exchange finished", err=True)
    return 0
