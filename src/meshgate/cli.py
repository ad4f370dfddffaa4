"""The ``meshgate`` command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from meshgate.config import ConfigError

app = typer.Typer(
    help="meshgate: API management, service mesh and integration in one platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help: options with their value's kind (TEXT, PATH), none on flags, and
    # descriptions wrapped to the terminal.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from meshgate import __version__

        typer.echo(f"meshgate {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """meshgate: API management, service mesh and integration in one platform."""


from meshgate.integration.cli import app as integration_app  # noqa: E402

app.add_typer(integration_app, name="integration")

EXAMPLE = "examples/gateway.yaml"
# Errors of one file printed at most; the rest are counted.
MAX_ERRORS_SHOWN = 200


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
        Path | None,
        typer.Option(
            help="Gateway file whose products seed the control plane and whose listen "
            "addresses the gateway takes; the bundled example by default."
        ),
    ] = None,
    upstream: Annotated[
        str, typer.Option(help="Address of the demo echo upstream.")
    ] = "127.0.0.1:9001",
    control_listen: Annotated[
        str, typer.Option(help="Address of the control plane's admin and data-plane API.")
    ] = "127.0.0.1:8090",
    data_dir: Annotated[
        Path, typer.Option(help="The control plane's SQLite file, its token, the gateway cache.")
    ] = Path("meshgate-data"),
    integration_listen: Annotated[
        str, typer.Option(help="Where the example integration route serves POST /orders.")
    ] = "127.0.0.1:8088",
    integration_admin_listen: Annotated[
        str,
        typer.Option(help="The example routes' admin listener (/metrics, /healthz, /routes)."),
    ] = "127.0.0.1:8089",
    tls_listen: Annotated[
        str,
        typer.Option(
            help="The gateway's HTTPS listener, with a certificate for localhost made by a "
            "local CA in DATA_DIR/tls; '' for none."
        ),
    ] = "127.0.0.1:8443",
    mesh: Annotated[
        bool,
        typer.Option(
            help="Start the mesh demo: orders and payments, two instances each, each behind "
            "a sidecar (ports 9101-9202 and 15000-15036)."
        ),
    ] = True,
    tracing_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Trace the gateway, the sidecars and the example routes, exporting spans to "
            "this OTLP/HTTP collector (e.g. http://127.0.0.1:4318)."
        ),
    ] = None,
    trace_sample_rate: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="The share of new traces sampled (1 by default)."),
    ] = None,
) -> None:
    """Start the demo: the control plane (SQLite), the echo upstream, a gateway attached to
    the control plane (seeded with the example products on the first start), the example
    integration routes, and a small service mesh."""
    import uvloop

    from meshgate.demo.echo import serve
    from meshgate.demo.mesh import MeshDemo, start_mesh_demo
    from meshgate.gateway import (
        ControlPlaneOptions,
        GatewayProcess,
        GatewayStartError,
        load_gateway_config,
    )
    from meshgate.integration import IntegrationError
    from meshgate.integration.example import RunningExample, start_example

    _logging()
    path = config or _example_path()
    try:
        example = load_gateway_config(path)
    except ConfigError as exc:
        raise _fail(f"invalid configuration: {exc}") from None
    # Every port is checked before anything is written: a second `up` says so and leaves
    # nothing behind.
    wanted: list[tuple[str, str]] = [
        ("--control-listen", control_listen),
        ("--upstream", upstream),
        ("--integration-listen", integration_listen),
        ("--integration-admin-listen", integration_admin_listen),
    ]
    if example.listen:
        wanted.append(("--config (listen)", example.listen))
    if example.admin_listen:
        wanted.append(("--config (admin_listen)", example.admin_listen))
    if tls_listen and example.tls is None:
        wanted.append(("--tls-listen", tls_listen))
    if mesh:
        from meshgate.demo.mesh import demo_ports

        wanted += [("--no-mesh", f"127.0.0.1:{port}") for port in demo_ports()]
    _check_ports(wanted)
    tracing = _tracing_flags(tracing_endpoint, trace_sample_rate)
    if tracing:
        from meshgate.config.tracing import with_flags

        try:
            with_flags(None, tracing)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    tracing_args: list[str] = []
    if tracing_endpoint is not None:
        tracing_args += ["--tracing-endpoint", tracing_endpoint]
    if trace_sample_rate is not None:
        tracing_args += ["--trace-sample-rate", str(trace_sample_rate)]
    token = _demo_token(data_dir)
    base = f"http://{control_listen}"
    stopping: list[float] = []
    state_files: list[Path] = []
    control = _start_control_plane(data_dir, control_listen, token)
    meshes: list[MeshDemo] = []
    try:
        _seed_control_plane(base, token, path)
        settings = data_dir / "gateway-settings.yaml"
        local = example.model_dump(mode="json", exclude={"products", "version"})
        certificates = None
        if tls_listen and example.tls is None:
            from meshgate.demo.tls import demo_certificates

            certificates = demo_certificates((data_dir / "tls").absolute())
            local["tls"] = {
                "listen": tls_listen,
                "certificates": [{"cert": str(certificates.cert), "key": str(certificates.key)}],
            }
        settings.write_text(json.dumps(local, indent=2) + "\n")
        from meshgate.config.identity import GATEWAY_SERVICE
        from meshgate.demo.mesh import bootstrap_token

        try:
            # The gateway's workload identity: its calls into the mesh are authenticated and
            # it signs the consumer tokens sidecars check.
            gateway_identity = bootstrap_token(base, token, GATEWAY_SERVICE)
        except RuntimeError as exc:
            raise _fail(str(exc)) from None
        options = ControlPlaneOptions(
            url=base,
            token=token,
            env="production",
            cache_dir=(data_dir / "gateway-cache").absolute(),
            name="demo-gateway",
            bootstrap_token=gateway_identity,
        )
        host, _, port = upstream.rpartition(":")
        running: list[RunningExample] = []
        if mesh:
            try:
                meshes.append(
                    start_mesh_demo(
                        base, token, (data_dir / "mesh").absolute(), tracing=tracing_args
                    )
                )
            except RuntimeError as exc:
                raise _fail(f"the mesh demo: {exc}") from None

        def ready(process: GatewayProcess) -> None:
            cfg = process.gateway.config
            typer.echo("meshgate is up:")
            typer.echo(f"  gateway        http://{cfg.listen} (admin http://{cfg.admin_listen})")
            https = None
            if cfg.tls is not None:
                port = cfg.tls.listen.rpartition(":")[2]
                https = f"https://localhost:{port}"
                ca = f" (trust {certificates.ca})" if certificates is not None else ""
                typer.echo(f"  https          {https}{ca}")
            typer.echo(f"  control plane  {base}/admin/api/ (OpenAPI: /admin/api/openapi.json)")
            typer.echo(f"  admin token    {token}  (kept in {data_dir / 'admin-token'})")
            product = example.products[0] if example.products else None
            if product is not None and product.applications and product.applications[0].keys:
                header = getattr(product.auth, "header", None) or "X-API-Key"
                key = product.applications[0].keys[0]
                prefix = product.path_prefix.rstrip("/")
                typer.echo("try:")
                typer.echo(f"  curl -i -H '{header}: {key}' http://{cfg.listen}{prefix}/hello")
                if https is not None:
                    cacert = f"--cacert {certificates.ca} " if certificates is not None else ""
                    typer.echo(f"  curl -i {cacert}-H '{header}: {key}' {https}{prefix}/hello")
                typer.echo(
                    f"  curl -s -H 'Authorization: Bearer {token}' {base}/admin/api/products"
                )
                month = time.strftime("%Y-%m", time.gmtime())
                auth = f"--token {token}"
                if base != DEFAULT_CONTROL_PLANE:
                    auth = f"--control-plane {base} {auth}"
                typer.echo("usage, alerts and billing (usage reaches analytics within seconds):")
                typer.echo(
                    f"  meshgate usage series --product {product.name} --granularity minute {auth}"
                )
                typer.echo(f"  meshgate usage limits {product.applications[0].id} {auth}")
                typer.echo(f"  curl -s -H 'Authorization: Bearer {token}' {base}/admin/api/alerts")
                typer.echo(f"  meshgate billing run --month {month} {auth}")
                typer.echo(f"  meshgate billing invoices {auth}")
            for example_run in running:
                for line in example_run.usage():
                    typer.echo(line)
            for demo in meshes:
                for line in demo.usage(gateway=f"http://{cfg.listen}"):
                    typer.echo(line)
            from meshgate import _runstate
            from meshgate.demo.mesh import INSTANCES

            state_files.append(
                _runstate.record(
                    data_dir,
                    "up",
                    {
                        "control_plane": base,
                        "gateway": {
                            "listen": cfg.listen,
                            "admin": cfg.admin_listen,
                            "tls": cfg.tls.listen if cfg.tls is not None else None,
                        },
                        "integration": [
                            {
                                "url": r.url,
                                "admin": r.admin.url if r.admin is not None else None,
                            }
                            for r in running
                        ],
                        "mesh": [
                            {
                                "service": i.service,
                                "version": i.version,
                                "app": i.app_port,
                                "inbound": i.inbound,
                                "outbound": i.outbound,
                                "admin": i.admin,
                            }
                            for i in INSTANCES
                        ]
                        if meshes
                        else [],
                    },
                )
            )
            typer.echo("stop with Ctrl-C")

        async def main() -> None:
            try:
                await serve(host, int(port))
            except OSError as exc:
                raise GatewayStartError(
                    f"cannot start the echo upstream on {upstream}: {exc.strerror}"
                ) from None
            try:
                running.append(
                    await start_example(
                        integration_listen,
                        admin_listen=integration_admin_listen,
                        tracing=tracing,
                    )
                )
            except IntegrationError as exc:
                raise GatewayStartError(f"the example integration routes: {exc}") from None
            process = GatewayProcess(
                settings, on_ready=ready, watch=False, control_plane=options, tracing=tracing
            )
            try:
                await process.run()
            finally:
                stopping.append(time.monotonic())
                typer.echo("stopped gateway")
                await running[0].stop()
                typer.echo("stopped integration routes and echo upstream")

        _serve_until_stopped(lambda: uvloop.run(main()))
    finally:
        # Children run in their own process groups, so that Ctrl-C reaches this process
        # alone and they stop in order: the gateway has flushed its usage to the control
        # plane above, the sidecars leave its registry, then it stops.
        if not stopping:
            stopping.append(time.monotonic())
        for demo in meshes:
            demo.stop()
            typer.echo("stopped mesh demo")
        control.terminate()
        try:
            control.wait(15)
        except subprocess.TimeoutExpired:
            control.kill()
        typer.echo("stopped control plane")
        for path in state_files:
            path.unlink(missing_ok=True)
        typer.echo(f"meshgate stopped in {time.monotonic() - stopping[0]:.1f} s")


def _check_ports(wanted: list[tuple[str, str]]) -> None:
    """Fail at once, naming the port and the option, when one of the addresses is taken."""
    import errno
    import socket

    for option, address in wanted:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _fail(
                    f"port {port} is in use: another meshgate up? stop it or pass {option}"
                ) from None
            raise _fail(f"cannot listen on {address}: {exc.strerror or exc}") from None
        except ValueError:
            raise _fail(f"{option} {address!r}: must be HOST:PORT") from None


def _demo_token(data_dir: Path) -> str:
    """The demo's admin token: made on the first start, kept (0600) for the next ones."""
    from meshgate.config import new_admin_token

    path = data_dir / "admin-token"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            token = path.read_text().strip()
            if token:
                return token
        token = new_admin_token()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        return token
    except OSError as exc:
        raise _fail(f"cannot keep the admin token in {path}: {exc.strerror or exc}") from None


def _start_control_plane(data_dir: Path, listen: str, token: str) -> subprocess.Popen[bytes]:
    """``meshgate control`` in a process of its own; returns once it answers."""
    import time
    import urllib.request

    log_path = data_dir / "control.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until it exits
    command = [
        sys.executable,
        "-m",
        "meshgate",
        "control",
        "--data-dir",
        str(data_dir),
        "--listen",
        listen,
    ]
    # The token goes through the environment: a command line is visible to every user.
    env = dict(os.environ, MESHGATE_ADMIN_TOKEN=token)
    # Its own process group: Ctrl-C reaches `up`, which stops it last.
    child = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while True:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise _fail("the control plane did not start: " + " / ".join(tail))
        try:
            with urllib.request.urlopen(f"http://{listen}/healthz", timeout=1):
                return child
        except OSError:
            if time.monotonic() > deadline:
                child.terminate()
                raise _fail(
                    f"the control plane did not answer on {listen}; see {log_path}"
                ) from None
            time.sleep(0.1)


def _seed_control_plane(base: str, token: str, path: Path) -> None:
    """On the first start (no products yet), apply the example file and promote it."""
    _, body = _admin_call(base, token, "GET", "/products", {"per_page": "1"})
    if json.loads(body)["total"]:
        return
    content_type = "application/json" if path.suffix == ".json" else "application/yaml"
    _admin_call(
        base, token, "POST", "/declarative", {"dry_run": "false"}, path.read_bytes(), content_type
    )
    _, body = _admin_call(base, token, "GET", "/products", {"per_page": "500"})
    for product in json.loads(body)["items"]:
        _seed_business(base, token, product["id"])
        _admin_call(base, token, "POST", f"/products/{product['id']}/promote")


# The demo's money and alerts: each plan costs 10.00 a month after a 5.00 setup fee, its first
# 100 hits a month are free and the next cost 0.01 each; alerts at 50, 80 and 100 % of a limit.
_DEMO_PRICING = (
    {"min": 1, "max": 100, "cost_per_unit": "0"},
    {"min": 101, "cost_per_unit": "0.01"},
)


def _seed_business(base: str, token: str, product_id: int) -> None:
    def call(method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        _, answer = _admin_call(base, token, method, path, None, data, "application/json")
        return json.loads(answer) if answer else None

    metrics = call("GET", f"/products/{product_id}/metrics")
    assert isinstance(metrics, dict)
    hits = next((m for m in metrics["items"] if m["name"] == "hits"), None)
    plans = call("GET", f"/products/{product_id}/plans")
    assert isinstance(plans, dict)
    for plan in plans["items"]:
        call("PATCH", f"/plans/{plan['id']}", {"setup_fee": "5", "monthly_fee": "10"})
        if hits is not None:
            for rule in _DEMO_PRICING:
                call(
                    "POST", f"/plans/{plan['id']}/pricing_rules", {"metric_id": hits["id"], **rule}
                )
    call("PUT", f"/products/{product_id}/alert_levels", {"levels": [50, 80, 100]})


TracingEndpoint = Annotated[
    str | None,
    typer.Option(help="Turn tracing on, exporting spans to this OTLP/HTTP collector URL."),
]
TraceSampleRate = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Turn tracing on, sampling this share of new traces."),
]


def _tracing_flags(endpoint: str | None, rate: float | None) -> dict[str, object]:
    """Tracing settings given as flags: either turns tracing on."""
    flags: dict[str, object] = {}
    if endpoint is not None:
        flags["endpoint"] = endpoint
    if rate is not None:
        flags["sample_rate"] = rate
    if flags:
        flags["enabled"] = True
    return flags


@app.command()
def gateway(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Gateway configuration file; with --control-plane, local settings only.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes sharing the port (SO_REUSEPORT).")] = 1,
    reuse_port: Annotated[bool, typer.Option(hidden=True)] = False,
    watch: Annotated[
        bool, typer.Option(help="Reload when the file changes (SIGHUP always reloads).")
    ] = True,
    control_plane: Annotated[
        str | None,
        typer.Option(
            "--control-plane", help="Pull configuration snapshots from this control plane URL."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_CONTROL_PLANE_TOKEN", help="Data-plane token for the control plane."
        ),
    ] = None,
    env: Annotated[str, typer.Option(help="Environment whose snapshots to serve.")] = "production",
    cache_dir: Annotated[
        Path, typer.Option(help="Where the last good snapshot is kept for starts without it.")
    ] = Path("meshgate-cache"),
    name: Annotated[
        str | None,
        typer.Option(help="This gateway's id at the control plane (default: HOST-PORT)."),
    ] = None,
    identity_cert: Annotated[
        Path | None, typer.Option(help="This workload's PEM certificate chain (X.509-SVID).")
    ] = None,
    identity_key: Annotated[
        Path | None, typer.Option(help="The private key of --identity-cert (PEM).")
    ] = None,
    trust_bundle: Annotated[
        Path | None, typer.Option(help="The PEM roots that identities are checked against.")
    ] = None,
    bootstrap_token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_BOOTSTRAP_TOKEN",
            help="Get the gateway's workload identity (service meshgate-gateway) from the "
            "control plane's CA with this token.",
        ),
    ] = None,
    bundle_refresh: Annotated[
        float,
        typer.Option(min=0.1, max=3600, help="Seconds between checks of the CA's trust bundle."),
    ] = 15.0,
    tracing_endpoint: TracingEndpoint = None,
    trace_sample_rate: TraceSampleRate = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the edge gateway from a configuration file, or from a control plane's snapshots."""
    from meshgate.gateway import ControlPlaneOptions, run_gateway

    _logging(log_level.upper())
    options = None
    if control_plane is not None:
        options = ControlPlaneOptions(
            url=control_plane,
            token=token or "",
            env=env,
            cache_dir=cache_dir.absolute(),
            name=name,
            bootstrap_token=bootstrap_token,
            bundle_interval=bundle_refresh,
        )
    elif bootstrap_token:
        raise _fail("--bootstrap-token needs --control-plane (its CA issues the certificate)")
    elif config is None:
        raise _fail("give --config FILE, or --control-plane URL with --token")
    identity = _identity_files(identity_cert, identity_key, trust_bundle)
    if identity is not None and bootstrap_token:
        raise _fail("give --bootstrap-token or --identity-cert/--identity-key, not both")
    _serve_until_stopped(
        lambda: run_gateway(
            config,
            workers=workers,
            reuse_port=reuse_port,
            watch=watch,
            control_plane=options,
            tracing=_tracing_flags(tracing_endpoint, trace_sample_rate),
            identity=identity,
        )
    )


def _identity_files(
    cert: Path | None, key: Path | None, bundle: Path | None
) -> dict[str, str] | None:
    """--identity-cert, --identity-key and --trust-bundle: all three, or none."""
    given = {"cert": cert, "key": key, "bundle": bundle}
    if all(v is None for v in given.values()):
        return None
    if any(v is None for v in given.values()):
        raise _fail("give --identity-cert, --identity-key and --trust-bundle together")
    return {k: str(v.absolute()) for k, v in given.items() if v is not None}


@app.command()
def control(
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_CONTROL_DATABASE_URL",
            help="sqlite:///path or postgresql://user@host/db; a SQLite file in --data-dir "
            "by default.",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded SQLite file lives.")] = Path(
        "meshgate-data"
    ),
    listen: Annotated[str, typer.Option(help="HOST:PORT of the admin and data-plane API.")] = (
        "127.0.0.1:8090"
    ),
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_ADMIN_TOKEN",
            help="Register this admin token (all scopes) on start; without it, a first start "
            "makes one and prints it once.",
        ),
    ] = None,
    custom_policies: Annotated[
        bool,
        typer.Option(
            "--custom-policies",
            help="Accept policies this control plane does not know (custom policies installed "
            "on your gateways); policy configurations are then checked by gateways only.",
        ),
    ] = False,
    mesh_ttl: Annotated[
        float,
        typer.Option(
            min=0.1,
            max=3600,
            help="Seconds a sidecar's registration lives without a heartbeat (it sends one "
            "every third of it).",
        ),
    ] = 10.0,
    mesh_grace: Annotated[
        float,
        typer.Option(
            min=0,
            max=3600,
            help="Seconds a registration outlives the closed endpoint stream bound to it.",
        ),
    ] = 1.0,
    mesh_max_instances: Annotated[
        int, typer.Option(min=1, help="Registered instances at most, in all.")
    ] = 20_000,
    mesh_max_instances_per_token: Annotated[
        int, typer.Option(min=1, help="Registered instances at most, per token.")
    ] = 5_000,
    mesh_max_streams: Annotated[
        int, typer.Option(min=1, help="Open endpoint streams at most, in all.")
    ] = 10_000,
    mesh_max_streams_per_token: Annotated[
        int, typer.Option(min=1, help="Open endpoint streams at most, per token.")
    ] = 5_000,
    trust_domain: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_TRUST_DOMAIN",
            help="The mesh's SPIFFE trust domain (default meshgate.local).",
        ),
    ] = None,
    cert_ttl: Annotated[
        float,
        typer.Option(
            envvar="MESHGATE_CERT_TTL",
            min=10,
            max=366 * 86400,
            help="Seconds a workload certificate lives (renewed at half of it).",
        ),
    ] = 86400.0,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHGATE_CA_CERT",
            help="Sign with this intermediate CA certificate (PEM, chain allowed) under your "
            "own root, instead of a root this control plane makes.",
        ),
    ] = None,
    ca_key: Annotated[
        Path | None,
        typer.Option(envvar="MESHGATE_CA_CERT_KEY", help="The --ca-cert's private key (PEM)."),
    ] = None,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHGATE_CA_BUNDLE", help="Your root(s) that --ca-cert chains to (PEM)."
        ),
    ] = None,
    ca_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHGATE_CA_KEY_FILE",
            help="File holding the key (base64, 32 bytes) that encrypts the CA's root key in "
            "the store; MESHGATE_CA_KEY gives it directly; default DATA_DIR/ca.key.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the control plane: admin API, snapshots, the data-plane API gateways pull, and the
    mesh's configuration, registry and endpoint streams for sidecars."""
    from meshgate import _runstate
    from meshgate.config.identity import TRUST_DOMAIN
    from meshgate.control import ControlPlane, ControlSettings, RegistrySettings
    from meshgate.control._ca import CaSettings
    from meshgate.control._runner import ControlStartError, database_url_for, run_control
    from meshgate.policies import schemas

    _logging(log_level.upper())
    try:
        url = database_url or database_url_for(data_dir)
        settings = ControlSettings(
            database_url=url,
            listen=listen,
            admin_token=admin_token,
            data_dir=data_dir,
            ca=CaSettings.from_env(
                trust_domain=trust_domain or TRUST_DOMAIN,
                cert_ttl=cert_ttl,
                key_file=ca_key_file,
                cert=ca_cert,
                cert_key=ca_key,
                bundle=ca_bundle,
            ),
            # Products are checked as gateways check them, policy configurations included.
            policy_schemas=None if custom_policies else schemas(),
            registry=RegistrySettings(
                ttl=mesh_ttl,
                grace=mesh_grace,
                max_instances=mesh_max_instances,
                max_instances_per_token=mesh_max_instances_per_token,
                max_streams=mesh_max_streams,
                max_streams_per_token=mesh_max_streams_per_token,
            ),
        )

        def ready(plane: ControlPlane) -> None:
            _runstate.record(data_dir, "control", {"listen": listen, "url": f"http://{listen}"})
            typer.echo(
                f"control plane: admin API http://{listen}/admin/api/ "
                f"(OpenAPI at /admin/api/openapi.json)"
            )
            if plane.bootstrap_token and not admin_token:
                kept = data_dir / "bootstrap-token"
                typer.echo(
                    f"admin token: {plane.bootstrap_token} (shown at each start until it is "
                    f"first used; kept in {kept} until then)"
                )

        def stopped() -> None:
            _runstate.forget(data_dir / "control.run.json")

        try:
            run_control(settings, on_ready=ready, on_stopped=stopped)
        finally:
            stopped()
    except ControlStartError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def sidecar(
    ctx: typer.Context,
    service: Annotated[
        str | None, typer.Option(help="The service this sidecar fronts (one instance of it).")
    ] = None,
    app_port: Annotated[int | None, typer.Option(help="The port the app listens on.")] = None,
    version: Annotated[
        str | None, typer.Option(help="The instance's version label (subsets select on it).")
    ] = None,
    zone: Annotated[str | None, typer.Option(help="The instance's zone (locality).")] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Further labels, KEY=VALUE; repeat for several.")
    ] = None,
    app_address: Annotated[str | None, typer.Option(help="The app's address.")] = None,
    ready_path: Annotated[
        str | None,
        typer.Option(help="The app is ready when GET PATH answers 2xx (else: when it accepts)."),
    ] = None,
    inbound: Annotated[
        str | None, typer.Option(help="HOST:PORT other services call (default 0.0.0.0:15006).")
    ] = None,
    outbound: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the app's HTTP proxy (default 127.0.0.1:15001)."),
    ] = None,
    admin: Annotated[
        str | None, typer.Option(help="HOST:PORT of /healthz /readyz /metrics (127.0.0.1:15000).")
    ] = None,
    upstream: Annotated[
        list[str] | None,
        typer.Option(help="SERVICE=PORT: a local port that reaches SERVICE; repeat for several."),
    ] = None,
    advertise: Annotated[
        str | None, typer.Option(help="The address registered for this instance.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Mesh file: services, routes, policies, and sidecar settings."
        ),
    ] = None,
    control_plane: Annotated[
        str | None, typer.Option("--control-plane", help="The control plane's URL.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="MESHGATE_CONTROL_PLANE_TOKEN", help="Data-plane token."),
    ] = None,
    env: Annotated[str, typer.Option(help="Environment whose mesh configuration to use.")] = (
        "production"
    ),
    bootstrap_token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_BOOTSTRAP_TOKEN",
            help="Get this instance's workload certificate from the control plane's CA with "
            "this token (see `meshgate mesh token create`).",
        ),
    ] = None,
    bundle_refresh: Annotated[
        float,
        typer.Option(min=0.1, max=3600, help="Seconds between checks of the CA's trust bundle."),
    ] = 15.0,
    drain_seconds: Annotated[
        float | None, typer.Option(help="Grace for in-flight requests on SIGTERM.")
    ] = None,
    edge_interval: Annotated[
        float,
        typer.Option(
            min=0.2,
            max=3600,
            help="Seconds between reports of this sidecar's calls for the service graph.",
        ),
    ] = 10.0,
    tracing_endpoint: TracingEndpoint = None,
    trace_sample_rate: TraceSampleRate = None,
    identity_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM chain naming this service's SPIFFE ID (mutual TLS); SIGHUP re-reads."
        ),
    ] = None,
    identity_key: Annotated[Path | None, typer.Option(help="The certificate's PEM key.")] = None,
    trust_bundle: Annotated[
        Path | None, typer.Option(help="PEM roots peers' certificates chain to.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run a sidecar beside one instance of a service; `-- APP ARGS` starts the app once the
    sidecar serves, and the sidecar exits with the app."""
    from meshgate.config.mesh import load_mesh, parse_mesh
    from meshgate.mesh import ControlPlaneSettings
    from meshgate.mesh.__main__ import ENV as SIDECAR_ENV

    _logging(log_level.upper())
    app_command = list(ctx.args)
    if app_command and app_command[0] == "--":
        app_command = app_command[1:]
    if app_command and app_command[0].startswith("-"):
        raise _fail(f"unknown option {app_command[0]}; put the app's command after --")
    given: dict[str, object] = {
        "service": service,
        "app_port": app_port,
        "version": version,
        "zone": zone,
        "app_address": app_address,
        "inbound": inbound,
        "outbound": outbound,
        "admin": admin,
        "advertise": advertise,
        "drain_seconds": drain_seconds,
        # Absolute: SIGHUP reads them again, from wherever.
        "identity_cert": str(identity_cert.absolute()) if identity_cert else None,
        "identity_key": str(identity_key.absolute()) if identity_key else None,
        "trust_bundle": str(trust_bundle.absolute()) if trust_bundle else None,
    }
    flags = {k: v for k, v in given.items() if v is not None}
    tracing = _tracing_flags(tracing_endpoint, trace_sample_rate)
    if tracing:
        flags["tracing"] = tracing
    if ready_path is not None:
        flags["readiness"] = {"http": ready_path}
    try:
        if label:
            flags["labels"] = dict(_pair(item, "--label", "KEY=VALUE") for item in label)
        if upstream:
            flags["upstreams"] = [
                {"service": name, "local_port": _port(port)}
                for name, port in (_pair(item, "--upstream", "SERVICE=PORT") for item in upstream)
            ]
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        if config is not None:
            loaded = load_mesh(config, sidecar=flags)
        else:
            # Flags only: checked as a file holding just them would be, with their paths.
            loaded = parse_mesh("{}", "flags", sidecar=flags)
    except ConfigError as exc:
        raise _fail(f"invalid configuration: {exc}") from None
    settings = loaded.sidecar
    if settings is None:
        raise _fail("give --service and --app-port, or a sidecar section in --config")
    cp = None
    if control_plane is not None:
        if not token:
            raise _fail("--control-plane needs --token (or MESHGATE_CONTROL_PLANE_TOKEN)")
        cp = ControlPlaneSettings(
            control_plane, token, env, edge_interval, bootstrap_token, bundle_refresh
        )
    elif bootstrap_token:
        raise _fail("--bootstrap-token needs --control-plane (its CA issues the certificate)")
    elif config is None:
        raise _fail("give --config FILE, or --control-plane URL with --token")
    # The sidecar runs without this command line's parser: the process becomes it.
    args = {
        "settings": settings.model_dump(mode="json"),
        "config_path": str(config.absolute()) if config is not None and cp is None else None,
        "control_plane": vars(cp) if cp is not None else None,
        "app_command": app_command,
        "log_level": log_level.upper(),
    }
    environment = {**os.environ, SIDECAR_ENV: json.dumps(args)}
    # Secrets ride in SIDECAR_ENV, which the sidecar takes out: the app does not inherit them.
    environment.pop(BOOTSTRAP_TOKEN_ENV, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "meshgate.mesh"], environment)


def _pair(item: str, option: str, form: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} {item!r}: must be {form}")
    return key, value


def _port(value: str) -> int:
    if not value.isdigit():
        raise ValueError(f"--upstream: {value!r} is not a port number")
    return int(value)


@app.command()
def status(
    data_dir: Annotated[
        Path, typer.Option(help="The data directory `up` or `control` was started with.")
    ] = Path("meshgate-data"),
    token: Annotated[
        str | None,
        typer.Option(
            envvar="MESHGATE_ADMIN_TOKEN",
            help="An admin token (read scope); DATA_DIR's admin-token file by default.",
        ),
    ] = None,
) -> None:
    """What runs under the data directory: each component, its addresses, whether it
    answers; the gateways attached to the control plane and the version each applied; the
    mesh's instances. Exit status 1 when nothing runs or a component does not answer."""
    from meshgate import _runstate

    up = _runstate.read(data_dir, "up")
    control = _runstate.read(data_dir, "control")
    if up is None and control is None:
        typer.echo(f"nothing runs under {data_dir}")
        raise typer.Exit(1)
    healthy = True

    def line(name: str, where: str, ok: bool, extra: str = "") -> None:
        nonlocal healthy
        healthy = healthy and ok
        state = "answering" if ok else "NOT ANSWERING"
        typer.echo(f"  {name:<17} {where}  {state}{extra}")

    typer.echo(f"meshgate under {data_dir}:")
    if up is not None:
        alive = _runstate.alive(up.get("pid"))
        healthy = alive
        typer.echo(f"  {'meshgate up':<17} pid {up.get('pid')}  {'running' if alive else 'GONE'}")
    base = None
    if control is not None:
        base = str(control.get("url"))
        line(
            "control plane",
            f"{base}/admin/api/",
            _runstate.answers(control.get("listen")),
            f" (pid {control.get('pid')})",
        )
    elif up is not None:
        base = str(up.get("control_plane"))
    if up is not None:
        gateway = up.get("gateway") or {}
        for key, label in (("listen", "gateway"), ("tls", "https"), ("admin", "gateway admin")):
            if gateway.get(key):
                line(label, str(gateway[key]), _runstate.answers(gateway[key]))
        for integration in up.get("integration") or []:
            url = str(integration.get("url"))
            line("integration", url, _runstate.answers(url.split("//")[-1].split("/")[0]))
            if integration.get("admin"):
                admin = str(integration["admin"])
                line("integration admin", admin, _runstate.answers(admin.split("//")[-1]))
        for i in up.get("mesh") or []:
            ok = _runstate.answers(f"127.0.0.1:{i.get('inbound')}")
            line(
                "sidecar",
                f"{i.get('service')} {i.get('version')} inbound :{i.get('inbound')} "
                f"outbound :{i.get('outbound')} admin :{i.get('admin')}",
                ok,
            )
    token = token or _kept_token(data_dir)
    if base is not None and token is not None:
        _status_from_control_plane(base, token)
    elif base is not None:
        typer.echo("  (give --token to list the gateways and the mesh's instances)")
    if not healthy:
        raise typer.Exit(1)


def _kept_token(data_dir: Path) -> str | None:
    for name in ("admin-token", "bootstrap-token"):
        try:
            token = (data_dir / name).read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def _status_from_control_plane(base: str, token: str) -> None:
    """The gateways with the version each applied, and the mesh's instances per service."""
    import urllib.error
    import urllib.request

    def get(path: str) -> Any:
        request = urllib.request.Request(
            f"{base}/admin/api{path}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = json.loads(response.read())
        except (OSError, ValueError):
            return None
        return body

    environments = get("/environments")
    latest = {
        e.get("name"): e.get("version")
        for e in (environments if isinstance(environments, list) else [])
        if isinstance(e, dict)
    }
    gateways = get("/dataplanes")
    for gw in gateways if isinstance(gateways, list) else []:
        newest = latest.get(gw.get("env"))
        applied = gw.get("version") or "none"
        behind = "" if newest is None or str(newest) == str(applied) else f" (newest {newest})"
        state = "connected" if gw.get("connected") else "not seen for a minute"
        error = f"; refused: {gw['error']}" if gw.get("error") else ""
        typer.echo(
            f"  {'gateway':<17} {gw.get('id')} ({gw.get('env')}) applied version "
            f"{applied}{behind}, {state}{error}"
        )
    instances = get("/mesh/instances?env=production&per_page=5000")
    counts: dict[str, list[int]] = {}
    items = instances.get("items") if isinstance(instances, dict) else None
    for item in items if isinstance(items, list) else []:
        entry = counts.setdefault(str(item.get("service")), [0, 0])
        entry[0] += 1
        entry[1] += 1 if item.get("ready") else 0
    if counts:
        listed = ", ".join(
            f"{name} {n} ({ready} ready)" for name, (n, ready) in sorted(counts.items())
        )
        typer.echo(f"  {'mesh':<17} {listed}")


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Configuration file to check.")]) -> None:
    """Check a gateway configuration file; print every error with its path."""
    from meshgate.gateway import load_gateway_config

    try:
        config = load_gateway_config(file)
    except ConfigError as exc:
        for line in exc.errors[:MAX_ERRORS_SHOWN]:
            # A path says where in the document; a syntax error's line and column, or a
            # problem with the file itself, need the file's name.
            named = ":" not in line or line.startswith("line ")
            typer.echo(f"{file}: {line}" if named else line, err=True)
        if len(exc.errors) > MAX_ERRORS_SHOWN:
            more = len(exc.errors) - MAX_ERRORS_SHOWN
            typer.echo(f"{file}: ... and {more} more errors", err=True)
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


# Declarative management and imports, against a control plane's admin API (stdlib HTTP only).

ControlPlaneUrl = Annotated[
    str,
    typer.Option(
        "--control-plane", envvar="MESHGATE_CONTROL_PLANE_URL", help="The control plane's URL."
    ),
]
AdminToken = Annotated[
    str | None,
    typer.Option(envvar="MESHGATE_ADMIN_TOKEN", help="An admin token (write scope to change)."),
]
ReadToken = Annotated[
    str | None,
    typer.Option(envvar="MESHGATE_ADMIN_TOKEN", help="An admin token (read scope is enough)."),
]
DEFAULT_CONTROL_PLANE = "http://127.0.0.1:8090"
BOOTSTRAP_TOKEN_ENV = "MESHGATE_BOOTSTRAP_TOKEN"

import_app = typer.Typer(
    help="Import API descriptions into the control plane.", no_args_is_help=True
)
app.add_typer(import_app, name="import")


def _admin_call(
    base: str,
    token: str | None,
    method: str,
    path: str,
    params: dict[str, str] | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, bytes]:
    """One admin API request; a refused one becomes its problem's lines and exit 1."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not token:
        raise _fail("give --token (or MESHGATE_ADMIN_TOKEN): an admin token of the control plane")
    url = base.rstrip("/") + "/admin/api" + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        _report_problem(exc.code, exc.read())
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _fail(f"cannot reach the control plane at {base}: {reason}") from None


def _report_problem(status: int, body: bytes) -> None:
    try:
        problem = json.loads(body)
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    errors = problem.get("errors") or []
    detail = problem.get("detail") or body.decode(errors="replace")[:500]
    typer.echo(
        f"error: HTTP {status}: {detail if not errors else problem.get('title', '')}", err=True
    )
    for error in errors:
        typer.echo(f"  {error.get('field')}: {error.get('message')}", err=True)


def _print_changes(result: dict[str, object]) -> None:
    colours = {"+": typer.colors.GREEN, "~": typer.colors.YELLOW, "-": typer.colors.RED}
    changes = result.get("changes") or []
    assert isinstance(changes, list)
    for change in changes:
        text = str(change["text"])
        typer.secho(text, fg=colours.get(text[:1]))
    for note in result.get("notes") or []:  # type: ignore[attr-defined]
        typer.echo(f"note: {note}", err=True)
    counts = result.get("summary") or {}
    assert isinstance(counts, dict)
    if not changes:
        typer.echo("no changes")
    elif result.get("dry_run"):
        typer.echo(
            f"{counts['add']} to add, {counts['change']} to change, {counts['remove']} to "
            "remove (dry run: nothing applied)"
        )
    else:
        mesh = any(c.get("resource") == "mesh_service" for c in changes)
        typer.echo(
            f"applied: {counts['add']} added, {counts['change']} changed, {counts['remove']} "
            "removed (in staging: promote products"
            + (", and the mesh (POST /admin/api/mesh/promote)," if mesh else "")
            + " to reach production)"
        )


@app.command("apply")
def apply_file(
    file: Annotated[Path, typer.Argument(help="Gateway configuration file (YAML or JSON).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the difference.")] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            help="Remove the products the file does not name (default); --no-prune leaves "
            "them alone.",
        ),
    ] = True,
    applications: Annotated[
        bool,
        typer.Option(
            "--applications/--skip-applications",
            help="Synchronise applications and keys too (default); --skip-applications "
            "leaves them as they are.",
        ),
    ] = True,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: AdminToken = None,
) -> None:
    """Show the difference between a declarative file and the control plane, then apply it."""
    from meshgate.config.loader import load_declarative
    from meshgate.policies import schemas

    try:
        # Policies are checked here too: the control plane stores them as given.
        load_declarative(file, policy_schemas=schemas())
    except ConfigError as exc:
        for line in exc.errors:
            typer.echo(f"{file}: {line}", err=True)
        raise typer.Exit(1) from None
    content_type = "application/json" if file.suffix == ".json" else "application/yaml"
    params = {
        "dry_run": str(dry_run).lower(),
        "prune": str(prune).lower(),
        "applications": str(applications).lower(),
    }
    _, body = _admin_call(
        control_plane, token, "POST", "/declarative", params, file.read_bytes(), content_type
    )
    _print_changes(json.loads(body))


@app.command("export")
def export_file(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    applications: Annotated[
        bool,
        typer.Option(
            "--applications/--skip-applications", help="Include applications and key hashes."
        ),
    ] = True,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: ReadToken = None,
) -> None:
    """Write the control plane's products (and the mesh's staging services) as a declarative
    file (YAML)."""
    from meshgate.config.loader import parse_declarative

    params = {"format": "yaml", "applications": str(applications).lower()}
    _, body = _admin_call(control_plane, token, "GET", "/declarative", params)
    text = body.decode()
    try:
        parse_declarative(text, "export")
    except ConfigError as exc:
        typer.echo("warning: apply will refuse this export until these are fixed:", err=True)
        for line in exc.errors:
            typer.echo(f"  {line}", err=True)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


@import_app.command("openapi")
def import_openapi(
    spec: Annotated[Path, typer.Argument(help="OpenAPI 3.x document (YAML or JSON).")],
    product: Annotated[str, typer.Option(help="The product to create or update.")],
    backend: Annotated[
        str | None,
        typer.Option(help="Backend URL (http://), when the first server's URL is not one."),
    ] = None,
    path_prefix: Annotated[
        str | None, typer.Option(help="Where the product is at the gateway (default /PRODUCT).")
    ] = None,
    jwks_url: Annotated[
        str | None, typer.Option(help="oauth2 / openIdConnect: where gateways get the keys.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the difference.")] = False,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: AdminToken = None,
) -> None:
    """Create or update a product from an OpenAPI document: methods, rules, auth, backend."""
    try:
        document = spec.read_bytes()
    except OSError as exc:
        raise _fail(f"{spec}: cannot read: {exc.strerror or exc}") from None
    params = {"product": product, "dry_run": str(dry_run).lower()}
    for name, value in (("backend", backend), ("path_prefix", path_prefix), ("jwks_url", jwks_url)):
        if value is not None:
            params[name] = value
    content_type = "application/json" if spec.suffix == ".json" else "application/yaml"
    _, body = _admin_call(
        control_plane, token, "POST", "/imports/openapi", params, document, content_type
    )
    result = json.loads(body)
    changed = bool(result.get("changes"))
    _print_changes(result)
    if not dry_run and (changed or result["created"]):
        verb = "created" if result["created"] else "updated"
        typer.echo(
            f"{verb} product {product} (id {result['product']['id']}): "
            f"{result['operations']} operations"
        )


usage_app = typer.Typer(
    help="Read usage analytics from the control plane: series, top applications, limits.",
    no_args_is_help=True,
)
app.add_typer(usage_app, name="usage")
Granularity = Annotated[
    str, typer.Option(help="minute, hour, day or month (minutes are kept two days).")
]
Since = Annotated[str | None, typer.Option(help="Start, ISO 8601 (UTC unless an offset is given).")]
Until = Annotated[str | None, typer.Option(help="End, exclusive, ISO 8601; default now.")]
AsCsv = Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")]


def _analytics(
    control_plane: str, token: str | None, path: str, params: dict[str, str | None], as_csv: bool
) -> object:
    query = {k: v for k, v in params.items() if v is not None}
    if as_csv:
        query["format"] = "csv"
    _, body = _admin_call(control_plane, token, "GET", "/analytics" + path, query)
    if as_csv:
        typer.echo(body.decode(), nl=False)
        return None
    return json.loads(body)


def _table(rows: list[list[object]], header: list[str]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        typer.echo(
            "  ".join(
                c.rjust(w) if c[:1].isdigit() else c.ljust(w)
                for c, w in zip(row, widths, strict=True)
            ).rstrip()
        )


@usage_app.command("series")
def usage_series(
    metric: Annotated[str, typer.Option(help="The metric (or method).")] = "hits",
    product: Annotated[str | None, typer.Option(help="Only this product.")] = None,
    application: Annotated[str | None, typer.Option(help="Only this application (app id).")] = None,
    account: Annotated[int | None, typer.Option(help="Only this account's applications.")] = None,
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    as_csv: AsCsv = False,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: ReadToken = None,
) -> None:
    """A metric's usage per window, with the total."""
    params = {
        "metric": metric,
        "product": product,
        "application": application,
        "account_id": None if account is None else str(account),
        "granularity": granularity,
        "since": since,
        "until": until,
    }
    result = _analytics(control_plane, token, "/usage", params, as_csv)
    if isinstance(result, dict):
        _table([[p["start"], p["value"]] for p in result["series"]], ["window", metric])
        typer.echo(f"total {result['total']}")


@usage_app.command("top")
def usage_top(
    metric: Annotated[str, typer.Option(help="The metric (or method).")] = "hits",
    product: Annotated[str | None, typer.Option(help="Only this product.")] = None,
    granularity: Granularity = "day",
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(help="How many applications.")] = 10,
    as_csv: AsCsv = False,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: ReadToken = None,
) -> None:
    """The applications that used a metric most."""
    params = {
        "metric": metric,
        "product": product,
        "granularity": granularity,
        "since": since,
        "until": until,
        "limit": str(limit),
    }
    result = _analytics(control_plane, token, "/top_applications", params, as_csv)
    if isinstance(result, dict):
        rows = [
            [i["application"], i["product"], i["account_id"], i["value"]] for i in result["items"]
        ]
        _table(rows, ["application", "product", "account", metric])


@usage_app.command("limits")
def usage_limits(
    application: Annotated[str, typer.Argument(help="The application's app id.")],
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: ReadToken = None,
) -> None:
    """An application's usage now against each limit of its plan."""
    result = _analytics(control_plane, token, f"/applications/{application}/limits", {}, False)
    assert isinstance(result, dict)
    typer.echo(f"{result['application']} on {result['product']} / {result['plan']}")
    rows = [
        [
            i["metric"],
            i["period"],
            i["usage"],
            i["limit"],
            f"{i['percent']}%",
            i["window_end"] or "-",
        ]
        for i in result["limits"]
    ]
    _table(rows, ["metric", "period", "usage", "limit", "used", "resets"])


mesh_app = typer.Typer(help="The mesh's workload identities.", no_args_is_help=True)
mesh_token_app = typer.Typer(
    help="Bootstrap tokens: how a sidecar or gateway gets its first certificate.",
    no_args_is_help=True,
)
mesh_app.add_typer(mesh_token_app, name="token")
app.add_typer(mesh_app, name="mesh")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: str) -> int:
    """``90``, ``90s``, ``30m``, ``1h`` or ``7d`` in seconds."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit is not None else text
    if not number.isdigit() or int(number) == 0:
        raise _fail(f"--expires-in {value!r}: a duration such as 90s, 30m, 1h or 7d")
    return int(number) * (unit or 1)


@mesh_token_app.command("create")
def mesh_token_create(
    service: Annotated[
        str, typer.Option(help="The service (meshgate-gateway for an edge gateway).")
    ],
    env: Annotated[str, typer.Option(help="The environment.")] = "production",
    single_use: Annotated[
        bool, typer.Option("--single-use", help="Good for one certificate only.")
    ] = False,
    expires_in: Annotated[
        str | None, typer.Option(help="Refused after this long: 90s, 30m, 1h, 7d.")
    ] = None,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: AdminToken = None,
) -> None:
    """Make a bootstrap token; it is printed once (give it to the sidecar as
    MESHGATE_BOOTSTRAP_TOKEN)."""
    body: dict[str, object] = {"service": service, "env": env, "single_use": single_use}
    if expires_in is not None:
        body["expires_in"] = _seconds(expires_in)
    _, answer = _admin_call(
        control_plane,
        token,
        "POST",
        "/mesh/bootstrap-tokens",
        None,
        json.dumps(body).encode(),
        "application/json",
    )
    created = json.loads(answer)
    typer.echo(created["token"])
    expiry = created["expires_at"] or "never"
    typer.echo(
        f"bootstrap token {created['id']} for {created['spiffe_id']} "
        f"({'single use, ' if created['single_use'] else ''}expires {expiry}); shown once",
        err=True,
    )


@mesh_token_app.command("list")
def mesh_token_list(
    service: Annotated[str | None, typer.Option(help="Only this service's.")] = None,
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: AdminToken = None,
) -> None:
    """The bootstrap tokens (never their secret)."""
    params = {"per_page": "500", **({"service": service} if service else {})}
    _, answer = _admin_call(control_plane, token, "GET", "/mesh/bootstrap-tokens", params)
    rows = [
        [t["id"], t["spiffe_id"], t["state"], t["uses"], t["expires_at"] or "-"]
        for t in json.loads(answer)["items"]
    ]
    _table(rows, ["id", "identity", "state", "uses", "expires"])


@mesh_token_app.command("revoke")
def mesh_token_revoke(
    token_id: Annotated[int, typer.Argument(help="The token's id (see `list`).")],
    control_plane: ControlPlaneUrl = DEFAULT_CONTROL_PLANE,
    token: AdminToken = None,
) -> None:
    """Revoke a bootstrap token: no certificate is issued with it any more."""
    _admin_call(control_plane, token, "DELETE", f"/mesh/bootstrap-tokens/{token_id}")
    typer.echo(f"revoked bootstrap token {token_id}")


from meshgate.billing.cli import billing_app  # noqa: E402

app.add_typer(billing_app(_admin_call, DEFAULT_CONTROL_PLANE), name="billing")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
