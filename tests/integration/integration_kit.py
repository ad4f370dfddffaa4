"""Helpers of the integration runtime tests: run routes in a fresh context, or in a
``meshgate integration run`` process killed and started again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshgate.integration import IntegrationContext, Route


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def run_routes(
    routes: list[Route], scenario: Callable[[IntegrationContext], Awaitable[None]], **kwargs: object
) -> None:
    """Start ``routes`` in a fresh context, run ``scenario``, stop the context."""

    async def main() -> None:
        context = IntegrationContext(**kwargs)  # type: ignore[arg-type]
        context.add_routes(routes)
        await context.start()
        try:
            await scenario(context)
        finally:
            await context.stop(grace=2.0)

    run(main)


def killed_mid_route_then_restarted(
    routes: Path,
    log: Path,
    endpoint: str,
    settings: dict[str, str],
    between: Callable[[], None] | None = None,
) -> None:
    """At least once across a crash: run ``meshgate integration run ROUTES``, send
    ``b"precious"`` to ``endpoint`` once it has started, SIGKILL it while the message is in
    the route's ``delay`` step, then start it again (after ``between``). The route must end
    by logging ``done precious``: the restarted runtime has to get the message again from
    the broker, log it, and stop cleanly on SIGTERM."""

    async def send() -> None:
        context = IntegrationContext(settings=settings)
        try:
            exchange = await context.send(endpoint, b"precious")
            assert exchange.exception is None
        finally:
            await context.stop()

    first = _runtime(routes, log)
    try:
        wait_for_log(log, "integration routes started", first)
        asyncio.run(send())
        time.sleep(0.15)  # the message is in the delay step now
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert "done precious" not in log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    if between is not None:
        between()
    second = _runtime(routes, log)
    try:
        wait_for_log(log, "done precious", second)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0


def _runtime(routes: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "meshgate", "integration", "run", str(routes)],
            cwd=routes.parent,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"runtime exited {proc.returncode}: {path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout}s: {path.read_text()}")
