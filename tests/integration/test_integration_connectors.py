"""The in-process connectors (direct, seda, timer, log) and the context's life cycle."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from integration_kit import run, run_routes

from meshgate.integration import (
    DefinitionError,
    Exchange,
    IntegrationContext,
    IntegrationError,
    from_,
)
from meshgate.integration.testing import advise, mock_endpoint


def test_direct_runs_the_called_route_on_the_same_exchange() -> None:
    routes = [
        from_("direct:a", id="a").set_header("a", 1).to("direct:b").to("mock:out").build(),
        from_("direct:b", id="b").set_header("b", 2).transform(expr="{n: n, by: 'b'}").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        reply = await context.request("direct:a", {"n": 1})
        assert reply.body == {"n": 1, "by": "b"}
        assert reply.headers == {"a": 1, "b": 2}

    run_routes(routes, scenario)


def test_a_direct_loop_built_at_run_time_is_stopped() -> None:
    route = from_("direct:loop", id="loop").routing_slip("headers.next").build()

    async def scenario(context: IntegrationContext) -> None:
        result = await context.send("direct:loop", "x", {"next": "direct:loop"})
        assert "more than 64 nested direct calls" in str(result.exception)

    run_routes([route], scenario)


def test_seda_hands_over_asynchronously_with_concurrent_consumers() -> None:
    active = 0
    peak = 0

    async def work(exchange: Exchange) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.03)
        active -= 1

    routes = [
        from_("seda:work?concurrent_consumers=3", id="work").process(work).to("mock:done").build(),
        from_("direct:ask", id="ask").to("seda:work").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        started = time.monotonic()
        for i in range(6):
            await context.send("seda:work", i)
        assert time.monotonic() - started < 0.03  # in-only: nobody waited for the work
        done = await mock_endpoint(context, "mock:done").wait_for(6)
        assert sorted(e.body for e in done) == list(range(6))
        assert peak == 3
        # In-out waits for the consumer's route and gets its result.
        reply = await context.request("direct:ask", "q")
        assert reply.body == "q"

    run_routes(routes, scenario)


def test_a_full_seda_queue_refuses_when_told_not_to_block() -> None:
    routes = [from_("direct:in", id="r").to("seda:q?size=1&block_when_full=false").build()]

    async def scenario(context: IntegrationContext) -> None:
        assert (await context.send("direct:in", 1)).exception is None
        failed = await context.send("direct:in", 2)
        assert "the queue is full" in str(failed.exception)

    run_routes(routes, scenario)


def test_timer_fires_with_counter_and_repeat_count() -> None:
    route = from_("timer:tick?period=20&delay=0&repeat_count=3", id="t").to("mock:tick").build()

    async def scenario(context: IntegrationContext) -> None:
        ticks = await mock_endpoint(context, "mock:tick").wait_for(3, timeout=2)
        assert [t.properties["timer_counter"] for t in ticks] == [1, 2, 3]
        await asyncio.sleep(0.06)
        assert len(mock_endpoint(context, "mock:tick").received) == 3

    run_routes([route], scenario)


def test_log_endpoint_logs_the_body(caplog: pytest.LogCaptureFixture) -> None:
    route = from_("direct:in", id="r").to("log:orders.audit?show_headers=true").build()

    async def scenario(context: IntegrationContext) -> None:
        with caplog.at_level(logging.INFO, logger="orders.audit"):
            await context.send("direct:in", "hello", {"h": 1})

    run_routes([route], scenario)
    assert caplog.messages == ["Exchange[headers: {'h': 1}, body: hello]"]


def test_stop_drains_in_flight_exchanges() -> None:
    async def slow(exchange: Exchange) -> None:
        await asyncio.sleep(0.1)

    route = from_("seda:in", id="r").process(slow).to("mock:done").build()

    async def main() -> None:
        context = IntegrationContext()
        context.add_route(route)
        await context.start()
        await context.send("seda:in", "x")
        await asyncio.sleep(0.01)
        await context.stop(grace=2)
        assert mock_endpoint(context, "mock:done").bodies == ["x"]
        assert context.route_status("r") == "stopped"

    run(main)


def test_routes_start_and_stop_one_by_one() -> None:
    routes = [
        from_("direct:a", id="a").to("mock:a").build(),
        from_("direct:b", id="b").to("mock:b").auto_start(False).build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        assert context.route_status("b") == "stopped"
        assert "no started route consumes direct:b" in str(
            (await context.send("direct:b")).exception
        )
        await context.start_route("b")
        await context.send("direct:b", 1)
        await context.stop_route("a")
        assert context.route_status("a") == "stopped"
        assert (await context.send("direct:a")).exception is not None
        assert mock_endpoint(context, "mock:b").bodies == [1]

    run_routes(routes, scenario)


def test_bad_routes_are_refused_before_anything_starts() -> None:
    context = IntegrationContext()
    with pytest.raises(DefinitionError) as caught:
        context.add_routes(
            [
                from_("nope:x", id="a").build(),
                from_("direct:b", id="b").to("seda:q?size=x").build(),
                from_("direct:c", id="a").build(),
            ]
        )
    assert caught.value.errors == [
        "route 'a': unknown endpoint scheme 'nope' in 'nope:x' (known: amqp, cron, direct,"
        " file, http, kafka, log, mock, mqtt, nats, redis, seda, sql, timer)",
        "route 'b': seda:q?size=x: option 'size' must be an integer",
        "route 'a': a route with this id exists already",
    ]
    with pytest.raises(IntegrationError, match="no route 'zz'"):
        context.route_status("zz")


def test_advice_replaces_from_and_mocks_endpoints() -> None:
    original = (
        from_("amqp:queue:in", id="r")
        .to("amqp:queue:out?durable=true")
        .wire_tap("http://127.0.0.1:1/audit")
        .filter("`true`")
        .to("direct:keep")
        .end()
        .build()
    )
    advised = advise(
        original,
        replace_from="direct:start",
        mock_endpoints=["amqp:*", "http:*"],
        replace_to={"direct:keep": "mock:kept"},
    )
    assert original.from_uri == "amqp:queue:in"

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:start", "m")
        assert mock_endpoint(context, "mock:amqp:queue:out").bodies == ["m"]
        assert mock_endpoint(context, "mock:kept").bodies == ["m"]
        await mock_endpoint(context, "mock:http://127.0.0.1:1/audit").wait_for(1)

    run_routes([advised], scenario)


def test_mock_expectations_report_what_arrived() -> None:
    route = from_("direct:in", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        out = mock_endpoint(context, "mock:out").expect_bodies(1, 2)
        await context.send("direct:in", 1)
        await context.send("direct:in", 3)
        with pytest.raises(AssertionError, match=r"expected bodies \[1, 2\], received \[1, 3\]"):
            await out.assert_satisfied(timeout=0.1)
        out.reset()
        out.expect_count(1)
        with pytest.raises(AssertionError, match="expected 1 exchanges within 0.05s, received 0"):
            await out.assert_satisfied(timeout=0.05)

    run_routes([route], scenario)


def test_mock_waiters_wake_when_their_count_arrives() -> None:
    route = from_("seda:in", id="r").to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        out = mock_endpoint(context, "mock:out")
        two = asyncio.ensure_future(out.wait_for(2, timeout=2))
        five = asyncio.ensure_future(out.wait_for(5, timeout=0.3))
        for body in (1, 2, 3):
            await context.send("seda:in", body)
        assert [e.message.body for e in await two] == [1, 2]
        with pytest.raises(AssertionError, match="expected 5 exchanges within 0.3s, received 3"):
            await five
        assert out._waiters == []  # a waiter that timed out is forgotten
        assert len(await out.wait_for(3, timeout=0.01)) == 3  # already there: no wait

    run_routes([route], scenario)
