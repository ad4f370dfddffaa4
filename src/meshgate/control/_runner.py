"""Run the control plane: migrate, publish, then serve the API with uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import uvicorn

from meshgate.control._ca import CaError
from meshgate.control._plane import ControlPlane, ControlSettings
from meshgate.control.app import create_app

__all__ = ["ControlStartError", "database_url_for", "listen_socket", "run_control"]

log = logging.getLogger("meshgate.control")


class ControlStartError(Exception):
    """The control plane cannot start as asked; the message says why."""


def database_url_for(data_dir: Path) -> str:
    """The embedded default: a SQLite file in the data directory (made if missing)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlStartError(f"cannot create the data directory {data_dir}: {exc}") from None
    return f"sqlite:///{data_dir.resolve() / 'control.db'}"


def run_control(
    settings: ControlSettings,
    on_ready: Callable[[ControlPlane], None] | None = None,
    on_stopped: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. The listening socket is bound before anything is
    stored, so a busy port costs nothing (no admin token made and lost)."""
    sock = listen_socket(settings.listen)
    plane = ControlPlane(settings)
    try:
        plane.prepare()
    except CaError as exc:
        raise ControlStartError(f"the mesh CA: {exc}") from None
    except Exception as exc:  # the database is unreachable, or a migration failed
        raise ControlStartError(
            f"cannot open the database {plane.db.engine.url!r}: {str(exc).splitlines()[0]}"
        ) from None
    try:
        app = create_app(settings, plane)
    except ValueError as exc:  # a setting from the environment, e.g. MESHGATE_SMTP_URL
        raise ControlStartError(str(exc)) from None
    host, _, port = settings.listen.rpartition(":")
    config = uvicorn.Config(
        app,
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        log_config=None,
        access_log=False,
        lifespan="on",
        # Long polls and endpoint streams are ended first (below): what is left are
        # ordinary requests, which finish well within this.
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    stop_serving = server.shutdown

    async def shutdown(sockets: list[socket.socket] | None = None) -> None:
        # Endpoint streams never end by themselves: end them first, or the server would
        # wait its whole graceful timeout for them (their sidecars reconnect elsewhere).
        plane.registry.close()
        plane.end_long_polls()
        try:
            await stop_serving(sockets)
        finally:
            # uvicorn ends the process with the signal that stopped it, right after: what
            # must happen on the way out happens here.
            if on_stopped is not None:
                on_stopped()

    server.shutdown = shutdown  # type: ignore[method-assign]
    if on_ready is not None:
        original = server.startup

        async def startup(sockets: object = None) -> None:
            await original(sockets)  # type: ignore[arg-type]
            if server.started:
                on_ready(plane)

        server.startup = startup  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ControlStartError(f"cannot listen on {settings.listen}")


def listen_socket(listen: str) -> socket.socket:
    """A socket bound to ``HOST:PORT``, or ControlStartError naming the port in use."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError) as exc:
        raise ControlStartError(f"cannot listen on {listen}: {exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ControlStartError(
                f"port {port} is in use: another meshgate control or meshgate up? "
                "stop it or pass --listen"
            ) from None
        raise ControlStartError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
