"""The ``meshgate`` command."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from meshgate.config import ConfigError

app = typer.Typer(
    help="meshgate: API management, service mesh and integration in one platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXAMPLE = "examples/gateway.yaml"


def _example_path() -> Path:
    return Path(str(resources.files("meshgate").joinpath(EXAMPLE)))


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _serve_until_stopped(serve: Callable[[], None]) -> None:
    """Run a server; a configuration or start-up problem becomes one line and exit 1."""
    from meshgate.gateway import GatewayStartError

    try:
        serve()
    except ConfigError as exc:
        raise _fail(f"invalid configuration: {exc}") from None
    except GatewayStartError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def up(
    config: Annotated[
        Path | None, typer.Option(help="Gateway configuration; the bundled example by default.")
    ] = None,
    upstream: Annotated[
        str, typer.Option(help="Address of the demo echo upstream.")
    ] = "127.0.0.1:9001",
) -> None:
    """Start the demo: the echo upstream and the gateway with the example configuration."""
    import uvloop

    from meshgate.demo.echo import serve
    from meshgate.gateway import GatewayProcess, GatewayStartError

    _logging()
    path = config or _example_path()
    host, _, port = upstream.rpartition(":")

    def ready(process: GatewayProcess) -> None:
        cfg = process.gateway.config
        product = cfg.products[0] if cfg.products else None
        typer.echo(f"meshgate is up: gateway http://{cfg.listen}, admin http://{cfg.admin_listen}")
        if product is not None and product.applications and product.applications[0].keys:
            header = getattr(product.auth, "header", None) or "X-API-Key"
            key = product.applications[0].keys[0]
            prefix = product.path_prefix.rstrip("/")
            typer.echo("try:")
            typer.echo(f"  curl -i -H '{header}: {key}' http://{cfg.listen}{prefix}/hello")
            typer.echo(f"  curl -s http://{cfg.admin_listen}/usage/{product.applications[0].id}")
        typer.echo("stop with Ctrl-C")

    async def main() -> None:
        try:
            await serve(host, int(port))
        except OSError as exc:
            raise GatewayStartError(
                f"cannot start the echo upstream on {upstream}: {exc.strerror}"
            ) from None
        await GatewayProcess(path, on_ready=ready).run()

    _serve_until_stopped(lambda: uvloop.run(main()))


@app.command()
def gateway(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway configuration file.")],
    workers: Annotated[int, typer.Option(help="Processes sharing the port (SO_REUSEPORT).")] = 1,
    reuse_port: Annotated[bool, typer.Option(hidden=True)] = False,
    watch: Annotated[
        bool, typer.Option(help="Reload when the file changes (SIGHUP always reloads).")
    ] = True,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the edge gateway from a declarative configuration file."""
    from meshgate.gateway import run_gateway

    _logging(log_level.upper())
    _serve_until_stopped(
        lambda: run_gateway(config, workers=workers, reuse_port=reuse_port, watch=watch)
    )


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Configuration file to check.")]) -> None:
    """Check a gateway configuration file; print every error with its path."""
    from meshgate.gateway import load_gateway_config

    try:
        config = load_gateway_config(file)
    except ConfigError as exc:
        for line in exc.errors:
            typer.echo(f"{file}: {line}" if ":" not in line else line, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: valid ({len(config.products)} products)")


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option(help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of the gateway configuration."""
    from meshgate.config import json_schema
    from meshgate.policies import schemas

    text = json.dumps(json_schema(schemas()), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


@app.command()
def echo(
    address: Annotated[str, typer.Argument(help="HOST:PORT to listen on.")] = "127.0.0.1:9001",
) -> None:
    """Run the demo echo upstream (used by the demo, the tests and the benchmarks)."""
    from meshgate.demo.echo import main as echo_main

    echo_main([address])


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
