"""Error handling: redelivery with exponential backoff, then the dead letter channel."""

from __future__ import annotations

import time

from integration_kit import run_routes

from meshgate.integration import (
    ErrorHandler,
    Exchange,
    IntegrationContext,
    NoConsumerError,
    PayloadError,
    from_,
)
from meshgate.integration.testing import mock_endpoint


def test_redelivery_backs_off_exponentially_up_to_the_maximum_delay() -> None:
    moments: list[float] = []

    def failing(exchange: Exchange) -> None:
        moments.append(time.monotonic())
        raise ConnectionError("still down")

    handler = ErrorHandler(maximum_redeliveries=4, delay=0.02, backoff=2.0, max_delay=0.05)
    route = from_("direct:in", id="r", error_handler=handler).process(failing).build()

    async def scenario(context: IntegrationContext) -> None:
        result = await context.send("direct:in", "x")
        assert isinstance(result.exception, ConnectionError)
        assert result.failed_step == "steps[0].process"
        assert len(moments) == 5
        gaps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
        # 20 ms, 40 ms, then capped at 50 ms twice.
        for gap, expected in zip(gaps, [0.02, 0.04, 0.05, 0.05], strict=True):
            assert expected <= gap < expected + 0.04, gaps

    run_routes([route], scenario)


def test_a_redelivery_that_succeeds_continues_the_route() -> None:
    attempts = 0

    def flaky(exchange: Exchange) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise TimeoutError("slow")

    handler = ErrorHandler(maximum_redeliveries=5)
    route = from_("direct:in", id="r", error_handler=handler).process(flaky).to("mock:out").build()

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", "x")
        out = mock_endpoint(context, "mock:out").received
        assert len(out) == 1
        assert out[0].properties["redelivery_counter"] == 2

    run_routes([route], scenario)


def test_malformed_payloads_are_not_redelivered() -> None:
    handler = ErrorHandler(dead_letter="mock:dead", maximum_redeliveries=5, delay=1.0)
    route = from_("direct:in", id="r", error_handler=handler).unmarshal("json").build()

    async def scenario(context: IntegrationContext) -> None:
        started = time.monotonic()
        await context.send("direct:in", b"{oops")
        assert time.monotonic() - started < 0.5
        dead = mock_endpoint(context, "mock:dead").received[0]
        assert dead.headers["dead_letter_cause"].startswith("PayloadError: malformed JSON")
        assert isinstance(dead.properties["exception"], PayloadError)

    run_routes([route], scenario)


def test_the_dead_letter_channel_gets_the_original_message_with_cause_route_and_step() -> None:
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("boom")

    handler = ErrorHandler(dead_letter="direct:dead", maximum_redeliveries=1)
    routes = [
        from_("direct:in", id="orders", error_handler=handler)
        .set_header("stage", "changed")
        .transform("changed body")
        .choice()
        .when("`true`")
        .process(broken)
        .end()
        .build(),
        from_("direct:dead", id="dead").to("mock:dead").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        result = await context.send("direct:in", {"id": 1}, {"origin": "test"})
        assert result.exception is None  # handled by the dead letter channel
        dead = mock_endpoint(context, "mock:dead").received[0]
        assert dead.body == {"id": 1}
        assert dead.headers == {
            "origin": "test",
            "dead_letter_cause": "RuntimeError: boom",
            "dead_letter_route": "orders",
            "dead_letter_step": "steps[2].choice.when[0].steps[0].process",
        }
        assert context.route_stats("orders")["failed"] == 1

    run_routes(routes, scenario)


def test_a_failing_dead_letter_channel_leaves_the_exchange_failed() -> None:
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("boom")

    handler = ErrorHandler(dead_letter="direct:nobody")
    routes = [
        from_("direct:in", id="r", error_handler=handler).process(broken).build(),
        from_("direct:other", id="other").to("direct:nobody").build(),
        from_(
            "direct:nobody",
            id="nobody",
        )
        .auto_start(False)
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        result = await context.send("direct:in", "x")
        assert isinstance(result.exception, RuntimeError)
        result = await context.send("direct:other", "x")
        assert isinstance(result.exception, NoConsumerError)

    run_routes(routes, scenario)


def test_a_context_wide_error_handler_applies_to_routes_without_one() -> None:
    def broken(exchange: Exchange) -> None:
        raise RuntimeError("boom")

    route = from_("direct:in", id="r").process(broken).build()

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", "x")
        assert mock_endpoint(context, "mock:dead").received[0].headers["dead_letter_route"] == "r"

    run_routes([route], scenario, error_handler=ErrorHandler(dead_letter="mock:dead"))
