"""The cron connector: schedules (croniter) in a time zone, firings, skipped fires, stop."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from integration_kit import run_routes
from typer.testing import CliRunner

from meshgate.integration import Exchange, IntegrationContext, from_
from meshgate.integration._errors import EndpointError
from meshgate.integration.cli import app
from meshgate.integration.components.cron import CronEndpoint
from meshgate.integration.testing import mock_endpoint

PARIS = ZoneInfo("Europe/Paris")


def cron(context: IntegrationContext, uri: str) -> CronEndpoint:
    endpoint = context.endpoint(uri)
    assert isinstance(endpoint, CronEndpoint)
    return endpoint


def test_a_schedule_with_seconds_fires_every_second() -> None:
    route = from_("cron:tick?schedule=*+*+*+*+*+*", id="tick").to("mock:tick").build()

    async def scenario(context: IntegrationContext) -> None:
        ticks = await mock_endpoint(context, "mock:tick").wait_for(2, timeout=3)
        scheduled = [datetime.fromisoformat(t.headers["scheduled_time"]) for t in ticks]
        assert scheduled[0].microsecond == 0
        assert scheduled[1] - scheduled[0] == timedelta(seconds=1)
        assert scheduled[0].utcoffset() == timedelta(0)
        for tick in ticks:
            fired = datetime.fromisoformat(tick.headers["fire_time"])
            planned = datetime.fromisoformat(tick.headers["scheduled_time"])
            assert timedelta(0) <= fired - planned < timedelta(seconds=0.5)
            assert tick.body is None
            assert tick.properties["cron_name"] == "tick"

    run_routes([route], scenario)


def test_next_fire_times_follow_the_time_zone_and_dst() -> None:
    context = IntegrationContext()
    nightly = cron(context, "cron:nightly?schedule=0 2 * * *&timezone=Europe/Paris")
    after = datetime(2026, 1, 10, 12, 0, tzinfo=PARIS)
    assert nightly.next_fire(after) == datetime(2026, 1, 11, 2, 0, tzinfo=PARIS)
    assert nightly.next_fire(after).utcoffset() == timedelta(hours=1)
    summer = nightly.next_fire(datetime(2026, 7, 1, 12, 0, tzinfo=PARIS))
    assert summer.astimezone(ZoneInfo("UTC")).hour == 0  # 02:00 CEST is midnight UTC
    # The night clocks go forward, 02:00 does not exist: it fires at 03:00 CEST.
    spring = nightly.next_fire(datetime(2026, 3, 28, 12, 0, tzinfo=PARIS))
    assert spring.isoformat() == "2026-03-29T03:00:00+02:00"
    utc = cron(context, "cron:utc?schedule=0+2+*+*+*")
    assert utc.next_fire(after).isoformat() == "2026-01-11T02:00:00+00:00"


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("0%202%20*%20*%20*", "2026-01-11T02:00:00+00:00"),  # %20 between fields
        ("30+0+9+*+*+MON-FRI", "2026-01-12T09:00:30+00:00"),  # seconds first, as Quartz
        ("0 */15 * * * ?", "2026-01-10T12:15:00+00:00"),  # Quartz's "no specific value"
        ("0 0 0 1 1 * 2028", "2028-01-01T00:00:00+00:00"),  # a year field
        ("@monthly", "2026-02-01T00:00:00+00:00"),
    ],
)
def test_schedule_syntaxes(schedule: str, expected: str) -> None:
    endpoint = cron(IntegrationContext(), f"cron:c?schedule={schedule}")
    after = datetime(2026, 1, 10, 12, 0, tzinfo=ZoneInfo("UTC"))
    assert endpoint.next_fire(after).isoformat() == expected


def test_a_fire_time_passed_during_a_slow_route_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fired: list[datetime] = []

    async def slow(exchange: Exchange) -> None:
        fired.append(datetime.fromisoformat(exchange.headers["scheduled_time"]))
        if len(fired) == 1:
            await asyncio.sleep(1.2)

    route = from_("cron:slow?schedule=* * * * * *", id="slow").process(slow).build()

    async def scenario(context: IntegrationContext) -> None:
        while len(fired) < 2:
            await asyncio.sleep(0.01)
        assert fired[1] - fired[0] == timedelta(seconds=2)

    with caplog.at_level(logging.WARNING, logger="meshgate.integration.cron"):
        run_routes([route], scenario)
    assert "the route ran past the next fire time" in caplog.text


def test_stopping_cancels_the_schedule() -> None:
    route = from_("cron:tick?schedule=* * * * * *", id="tick").to("mock:tick").build()

    async def scenario(context: IntegrationContext) -> None:
        ticks = mock_endpoint(context, "mock:tick")
        await ticks.wait_for(1, timeout=2)
        await context.stop_route("tick")
        count = len(ticks.received)
        await asyncio.sleep(1.1)
        assert len(ticks.received) == count
        assert context.route_status("tick") == "stopped"

    run_routes([route], scenario)


def test_stopping_while_waiting_for_a_far_fire_time_is_prompt() -> None:
    route = from_("cron:yearly?schedule=@yearly", id="yearly").to("mock:y").build()

    async def main() -> None:
        context = IntegrationContext()
        context.add_route(route)
        await context.start()
        await asyncio.wait_for(context.stop(), 1.0)

    asyncio.run(main())


def test_bad_uris_are_clear_errors() -> None:
    context = IntegrationContext()
    cases = {
        "cron:": "give a name",
        "cron:n": "option 'schedule' is required",
        "cron:n?schedule=": "option 'schedule' is required",
        "cron:n?schedule=61 * * * *": "option 'schedule' is not a cron expression: .*out of range",
        "cron:n?schedule=* *": "option 'schedule' is not a cron expression: .*5, 6 or 7",
        "cron:n?schedule=0_2_*_*_*": r"separate the fields with spaces, '\+' or %20",
        "cron:n?schedule=0 0 30 2 *": "option 'schedule' matches no date in the next 50 years",
        "cron:n?schedule=@daily&timezone=Mars/Olympus": (
            "option 'timezone' must be an IANA time zone such as UTC or Europe/Paris,"
            " got 'Mars/Olympus'"
        ),
        "cron:n?schedule=@daily&timezone=../../etc/passwd": "option 'timezone' must be an IANA",
        "cron:n?schedule=@daily&period=5": "unknown option 'period'",
    }
    for uri, message in cases.items():
        with pytest.raises(EndpointError, match=message):
            context.endpoint(uri)


def test_validate_reports_a_bad_schedule(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - {id: nightly, from: 'cron:nightly?schedule=0 25 * * *', steps: [{log: hi}]}\n"
        "  - {id: ok, from: 'cron:ok?schedule=0 2 * * *&timezone=Europe/Paris',"
        " steps: [{log: hi}]}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(routes)])
    assert result.exit_code == 1
    assert result.output.startswith(
        "routes[0].from: cron:nightly?schedule=0 25 * * *: option 'schedule' is not a cron"
        " expression: "
    )
    assert len(result.output.splitlines()) == 1
