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
from typing import Any

from meshgate.integration import Exchange, IntegrationContext, Route


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


def stopped_mid_route_then_restarted(
    routes: Path, log: Path, endpoint: str, settings: dict[str, str], count: int = 3
) -> None:
    """Exactly once across a graceful stop: run ``meshgate integration run ROUTES``, send
    ``m0`` .. ``m<count-1>`` to ``endpoint``, SIGTERM it once ``m0`` is in the route. The
    route logs ``start {{ body }}``, waits in a ``delay`` step, logs ``done {{ body }}``.
    The runtime must take no message after the signal, finish and acknowledge those it
    took, and exit 0; a second runtime must then get the messages left in the broker, and
    only those: every message is done once over both runs."""

    async def send() -> None:
        context = IntegrationContext(settings=settings)
        try:
            for index in range(count):
                exchange = await context.send(endpoint, f"m{index}".encode())
                assert exchange.exception is None
        finally:
            await context.stop()

    bodies = [f"m{index}" for index in range(count)]
    first_log = log.with_suffix(".first")
    first = _runtime(routes, first_log)
    try:
        wait_for_log(first_log, "integration routes started", first)
        asyncio.run(send())
        wait_for_log(first_log, "start m0", first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0, first_log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    text = first_log.read_text()
    stopping = text.index("stopping: draining")
    taken = {body for body in bodies if f"start {body}" in text}
    assert all(text.rindex(f"start {body}") < stopping for body in taken), text
    assert taken == {body for body in bodies if f"done {body}" in text}, text
    left = [body for body in bodies if body not in taken]
    assert left, f"every message was taken before the signal; nothing was left: {text}"
    second = _runtime(routes, log)
    try:
        for body in left:
            wait_for_log(log, f"done {body}", second)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0, log.read_text()
    again = log.read_text()
    for body in bodies:
        assert (text + again).count(f"done {body}") == 1, (body, text, again)


def _runtime(routes: Path, log: Path, *options: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "meshgate", "integration", "run", str(routes), *options],
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


def run_sql(url: str, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    """Runs one statement outside the runtime, in its own transaction; its rows, if any."""
    from sqlalchemy import create_engine, text

    from meshgate.integration._sql_state import database_url

    engine = create_engine(database_url(url))
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


# The same at-least-once scenarios, run against each broker by its own test module.

Check = Callable[[], Awaitable[None]]


def redelivered_after_one_failure(
    publish: str, consume: str, settings: dict[str, Any], settled: Check | None = None
) -> Exchange:
    """Publishes ``m`` to ``publish``; the route consuming ``consume`` fails on the first
    delivery only. Returns the exchange of the redelivery, which completed; ``settled``
    then checks what the broker still holds."""
    from meshgate.integration import from_
    from meshgate.integration.testing import mock_endpoint

    attempts = 0
    received: list[Exchange] = []

    def flaky(exchange: Exchange) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("database down")

    routes = [
        from_("direct:in", id="publish").to(publish).build(),
        from_(consume, id="consume").process(flaky).to("mock:out").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", "m")
        received.extend(await mock_endpoint(context, "mock:out").wait_for(1))
        await asyncio.sleep(0.3)  # no third delivery
        assert attempts == 2
        assert len(mock_endpoint(context, "mock:out").received) == 1
        if settled is not None:
            await settled()

    run_routes(routes, scenario, settings=settings)
    assert received[0].message.body == b"m"
    return received[0]


def dead_lettered_once(
    publish: str,
    consume: str,
    dead: str,
    dead_consume: str,
    settings: dict[str, Any],
    settled: Check | None = None,
) -> None:
    """The route consuming ``consume`` always fails: after one redelivery the dead letter
    channel ``dead`` (read back from ``dead_consume``) gets the message as published, with
    the cause, route and step, once; ``settled`` then checks what the broker still holds."""
    from meshgate.integration import from_
    from meshgate.integration._model import ErrorHandler
    from meshgate.integration.testing import mock_endpoint

    attempts = 0

    def broken(exchange: Exchange) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("cannot process")

    handler = ErrorHandler(dead_letter=dead, maximum_redeliveries=1)
    routes = [
        from_("direct:in", id="publish").to(publish).build(),
        from_(consume, id="consume", error_handler=handler)
        .transform("changed")
        .process(broken)
        .build(),
        from_(dead_consume, id="dead").to("mock:dead").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", b"original")
        letter = (await mock_endpoint(context, "mock:dead").wait_for(1))[0]
        assert letter.body == b"original"
        assert letter.headers["dead_letter_cause"] == "ValueError: cannot process"
        assert letter.headers["dead_letter_route"] == "consume"
        assert letter.headers["dead_letter_step"] == "steps[1].process"
        await asyncio.sleep(0.3)
        assert attempts == 2  # the first try and one redelivery, then no more
        assert len(mock_endpoint(context, "mock:dead").received) == 1
        if settled is not None:
            await settled()

    run_routes(routes, scenario, settings=settings)
