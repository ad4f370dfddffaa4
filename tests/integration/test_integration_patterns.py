"""Every pattern, run in process through real routes, observed with mock endpoints."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from integration_kit import run_routes

from meshgate.integration import (
    CircuitOpenError,
    Exchange,
    IntegrationContext,
    PayloadError,
    SchemaValidationError,
    from_,
    parse_routes,
)
from meshgate.integration.testing import mock_endpoint


def test_choice_routes_by_content_and_otherwise_takes_the_rest() -> None:
    route = (
        from_("direct:in", id="r")
        .choice()
        .when("total > `1000`")
        .set_header("priority", "high")
        .to("mock:big")
        .when("total > `100`")
        .to("mock:medium")
        .otherwise()
        .to("mock:small")
        .end()
        .to("mock:all")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        for total in (5000, 500, 5):
            await context.send("direct:in", {"total": total})
        assert mock_endpoint(context, "mock:big").bodies == [{"total": 5000}]
        assert mock_endpoint(context, "mock:big").received[0].headers == {"priority": "high"}
        assert mock_endpoint(context, "mock:medium").bodies == [{"total": 500}]
        assert mock_endpoint(context, "mock:small").bodies == [{"total": 5}]
        assert len(mock_endpoint(context, "mock:all").received) == 3

    run_routes([route], scenario)


def test_filter_runs_its_steps_only_for_matching_messages() -> None:
    route = (
        from_("direct:in", id="r")
        .filter("headers.kind == 'order'")
        .to("mock:orders")
        .end()
        .to("mock:all")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", 1, {"kind": "order"})
        await context.send("direct:in", 2, {"kind": "ping"})
        assert mock_endpoint(context, "mock:orders").bodies == [1]
        assert mock_endpoint(context, "mock:all").bodies == [1, 2]

    run_routes([route], scenario)


def test_transform_set_and_remove_header_set_property_and_stop() -> None:
    route = (
        from_("direct:in", id="r")
        .set_property("who", expr="name")
        .set_header("greeting", template="hello {{ body.name }}")
        .remove_header("secret")
        .transform(expr="{name: name, upper: `true`}")
        .to("mock:mid")
        .transform(template="{{ properties.who }}!")
        .to("mock:out")
        .stop()
        .to("mock:never")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        reply = await context.request("direct:in", {"name": "ada"}, {"secret": "x", "keep": 1})
        assert reply.body == "ada!"
        mid = mock_endpoint(context, "mock:mid").received[0]
        assert mid.body == {"name": "ada", "upper": True}
        assert mid.headers == {"greeting": "hello ada", "keep": 1}
        assert mock_endpoint(context, "mock:never").received == []

    run_routes([route], scenario)


def test_marshal_and_unmarshal_in_a_route() -> None:
    route = (
        from_("direct:in", id="r")
        .unmarshal("csv", delimiter=";")
        .marshal("json")
        .to("mock:json")
        .unmarshal("json")
        .transform(expr="{order: {line: @}}")
        .marshal("xml")
        .to("mock:xml")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", b"sku;qty\r\na;1\r\nb;2\r\n")
        json_out = mock_endpoint(context, "mock:json").received[0]
        assert json_out.body == b'[{"sku":"a","qty":"1"},{"sku":"b","qty":"2"}]'
        assert json_out.headers["content-type"] == "application/json"
        xml_out = mock_endpoint(context, "mock:xml").received[0]
        assert b"<order><line><sku>a</sku><qty>1</qty></line>" in xml_out.body

    run_routes([route], scenario)


def test_validate_by_schema_and_predicate() -> None:
    route = (
        from_("direct:in", id="r")
        .validate(
            schema={"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}
        )
        .validate(expr="length(id) > `2`")
        .to("mock:ok")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        await context.request("direct:in", {"id": "abc"})
        with pytest.raises(SchemaValidationError, match=r"body\.id: 5 is not of type 'string'"):
            await context.request("direct:in", {"id": 5})
        with pytest.raises(SchemaValidationError, match="'id' is a required property"):
            await context.request("direct:in", {})
        with pytest.raises(SchemaValidationError, match="is not true"):
            await context.request("direct:in", {"id": "ab"})
        with pytest.raises(SchemaValidationError, match="unmarshal it first"):
            await context.request("direct:in", b'{"id": "abc"}')
        assert len(mock_endpoint(context, "mock:ok").received) == 1

    run_routes([route], scenario)


def test_split_sequential_gives_index_and_completion() -> None:
    route = (
        from_("direct:in", id="r")
        .split("items", aggregate="collect")
        .transform(expr="sku")
        .to("mock:item")
        .end()
        .to("mock:after")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"items": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]})
        items = mock_endpoint(context, "mock:item").received
        assert [e.body for e in items] == ["a", "b", "c"]
        assert [e.properties["split_index"] for e in items] == [0, 1, 2]
        assert [e.properties["split_complete"] for e in items] == [False, False, True]
        after = mock_endpoint(context, "mock:after").received[0]
        assert after.body == ["a", "b", "c"]
        assert after.properties["split_size"] == 3

    run_routes([route], scenario)


def test_split_streams_text_lines_without_listing_them() -> None:
    route = from_("direct:in", id="r").split(tokenize="\n").to("mock:line").end().build()

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", "a\nb\nc")
        await context.send("direct:in", b"x\ny")
        assert mock_endpoint(context, "mock:line").bodies == ["a", "b", "c", b"x", b"y"]

    run_routes([route], scenario)


def test_split_parallel_runs_parts_concurrently_bounded_and_keeps_order() -> None:
    running = 0
    peak = 0

    async def slow(exchange: Exchange) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        exchange.body = exchange.body * 10

    route = (
        from_("direct:in", id="r")
        .split(parallel=True, max_parallel=4, aggregate="collect")
        .process(slow)
        .end()
        .to("mock:out")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        started = time.monotonic()
        await context.send("direct:in", list(range(12)))
        elapsed = time.monotonic() - started
        assert mock_endpoint(context, "mock:out").bodies == [[i * 10 for i in range(12)]]
        assert peak == 4
        assert elapsed < 12 * 0.02

    run_routes([route], scenario)


def test_a_failing_part_fails_the_split() -> None:
    route = from_("direct:in", id="r").split().unmarshal("json").to("mock:part").end().build()

    async def scenario(context: IntegrationContext) -> None:
        exchange = await context.send("direct:in", [b"1", b"{", b"3"])
        assert isinstance(exchange.exception, PayloadError)
        assert exchange.failed_step == "steps[0].split.steps[0].unmarshal"
        assert mock_endpoint(context, "mock:part").bodies == [1]

    run_routes([route], scenario)


def test_aggregate_completes_by_size_per_correlation_key() -> None:
    route = (
        from_("direct:in", id="r")
        .aggregate("headers.order", completion_size=2, strategy="collect")
        .to("mock:batch")
        .end()
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        for body, order in [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a")]:
            await context.send("direct:in", body, {"order": order})
        batches = mock_endpoint(context, "mock:batch").received
        assert [b.body for b in batches] == [[1, 3], [2, 4]]
        assert batches[0].properties["aggregated_correlation_key"] == "a"
        assert batches[0].properties["aggregated_completed_by"] == "size"

    run_routes([route], scenario)


def test_aggregate_completes_by_timeout_interval_and_predicate() -> None:
    routes = parse_routes(
        """
routes:
  - id: by-timeout
    from: direct:t
    steps:
      - aggregate:
          correlation: key
          completion_timeout: 50ms
          strategy: merge
          steps: [{to: mock:timeout}]
  - id: by-interval
    from: direct:i
    steps:
      - aggregate:
          correlation: key
          completion_interval: 80ms
          steps: [{to: mock:interval}]
  - id: by-predicate
    from: direct:p
    steps:
      - aggregate:
          correlation: key
          completion_predicate: "length(@) >= `3` || contains(@[].last, `true`)"
          steps: [{to: mock:predicate}]
"""
    ).routes

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:t", {"key": "k", "a": 1})
        await context.send("direct:t", {"key": "k", "b": 2})
        await context.send("direct:i", {"key": "x"})
        await context.send("direct:i", {"key": "y"})
        await context.send("direct:p", {"key": "k", "last": False})
        await context.send("direct:p", {"key": "k", "last": True})
        timed = await mock_endpoint(context, "mock:timeout").wait_for(1, timeout=2)
        assert timed[0].body == {"key": "k", "a": 1, "b": 2}
        assert timed[0].properties["aggregated_completed_by"] == "timeout"
        interval = await mock_endpoint(context, "mock:interval").wait_for(2, timeout=2)
        assert sorted(e.body[0]["key"] for e in interval) == ["x", "y"]
        predicate = mock_endpoint(context, "mock:predicate").received
        assert [e.properties["aggregated_size"] for e in predicate] == [2]

    run_routes(routes, scenario)


def test_multicast_sequential_and_scatter_gather_with_timeout() -> None:
    async def slow(exchange: Exchange) -> None:
        await asyncio.sleep(1.0)
        exchange.body = "late"

    def answer(value: str) -> object:
        def set_body(exchange: Exchange) -> None:
            exchange.body = {value: exchange.body}

        return set_body

    routes = [
        from_("direct:seq", id="seq")
        .multicast()
        .to("mock:a")
        .to("mock:b")
        .end()
        .to("mock:after")
        .build(),
        from_("direct:gather", id="gather")
        .multicast(parallel=True, timeout="200ms", strategy="merge")
        .to("direct:quote-a")
        .to("direct:quote-b")
        .to("direct:quote-slow")
        .end()
        .to("mock:best")
        .build(),
        from_("direct:quote-a", id="qa").process(answer("a")).build(),
        from_("direct:quote-b", id="qb").process(answer("b")).build(),
        from_("direct:quote-slow", id="qs").process(slow).build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:seq", "m")
        assert mock_endpoint(context, "mock:a").bodies == ["m"]
        assert mock_endpoint(context, "mock:b").bodies == ["m"]
        started = time.monotonic()
        await context.send("direct:gather", 1)
        assert time.monotonic() - started < 0.8
        assert mock_endpoint(context, "mock:best").bodies == [{"a": 1, "b": 1}]

    run_routes(routes, scenario)


def test_recipient_list_and_routing_slip_from_headers() -> None:
    routes = [
        from_("direct:rl", id="rl")
        .recipient_list("headers.to", strategy="collect")
        .to("mock:rl-out")
        .build(),
        from_("direct:slip", id="slip").routing_slip("headers.slip").to("mock:slip-out").build(),
        from_("direct:double", id="double")
        .transform(expr="body.n")
        .process(lambda e: setattr(e, "body", {"n": e.body * 2}))
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:rl", "x", {"to": "mock:r1, mock:r2"})
        assert mock_endpoint(context, "mock:r1").bodies == ["x"]
        assert mock_endpoint(context, "mock:r2").bodies == ["x"]
        assert mock_endpoint(context, "mock:rl-out").bodies == [["x", "x"]]
        await context.send("direct:slip", {"n": 1}, {"slip": ["direct:double", "direct:double"]})
        assert mock_endpoint(context, "mock:slip-out").bodies == [{"n": 4}]
        failed = await context.send("direct:rl", "x", {"to": "nope:x"})
        assert "unknown endpoint scheme 'nope'" in str(failed.exception)

    run_routes(routes, scenario)


def test_wire_tap_sends_a_copy_without_waiting() -> None:
    async def slow(exchange: Exchange) -> None:
        await asyncio.sleep(0.1)

    routes = [
        from_("direct:in", id="r")
        .wire_tap("direct:audit")
        .transform("main")
        .to("mock:main")
        .build(),
        from_("direct:audit", id="audit")
        .process(slow)
        .transform("tapped")
        .to("mock:audit")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        started = time.monotonic()
        await context.send("direct:in", "m")
        assert time.monotonic() - started < 0.08
        assert mock_endpoint(context, "mock:main").bodies == ["main"]
        tapped = await mock_endpoint(context, "mock:audit").wait_for(1)
        assert tapped[0].body == "tapped"

    run_routes(routes, scenario)


def test_enrich_merges_or_sets_a_field() -> None:
    routes = [
        from_("direct:in", id="r")
        .enrich("direct:customer", strategy="merge")
        .enrich("direct:customer", target="customer")
        .to("mock:out")
        .build(),
        from_("direct:customer", id="c").transform(expr="{name: 'ada', id: id}").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"id": 1, "total": 3})
        assert mock_endpoint(context, "mock:out").bodies == [
            {"id": 1, "total": 3, "name": "ada", "customer": {"name": "ada", "id": 1}}
        ]

    run_routes(routes, scenario)


def test_throttle_and_delay_slow_the_flow() -> None:
    routes = [
        from_("direct:t", id="t").throttle(2, "100ms").to("mock:t").build(),
        from_("direct:d", id="d").delay("50ms").to("mock:d").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        started = time.monotonic()
        await asyncio.gather(*(context.send("direct:t", i) for i in range(5)))
        # 5 messages at 2 per 100 ms: the fifth waits for the third window.
        assert 0.19 < time.monotonic() - started < 0.5
        started = time.monotonic()
        await context.send("direct:d", 1)
        assert time.monotonic() - started >= 0.05

    run_routes(routes, scenario)


def test_circuit_breaker_opens_falls_back_and_closes_again() -> None:
    failing = True

    def backend(exchange: Exchange) -> None:
        if failing:
            raise ConnectionError("backend down")
        exchange.body = "fresh"

    routes = [
        from_("direct:in", id="r")
        .circuit_breaker(failure_threshold=2, open_duration="100ms")
        .process(backend)
        .fallback()
        .transform("cached")
        .end()
        .to("mock:out")
        .build(),
        from_("direct:bare", id="bare")
        .circuit_breaker(failure_threshold=1, open_duration="1s")
        .process(backend)
        .end()
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        nonlocal failing
        for _ in range(4):
            await context.send("direct:in", "x")
        out = mock_endpoint(context, "mock:out").received
        assert [e.body for e in out] == ["cached"] * 4
        assert [e.properties["circuit_breaker_state"] for e in out] == [
            "closed",
            "open",
            "open",
            "open",
        ]
        failing = False
        await asyncio.sleep(0.12)
        await context.send("direct:in", "x")
        assert out[-1].body == "fresh"
        failing = True
        first = await context.send("direct:bare", "x")
        assert isinstance(first.exception, ConnectionError)
        second = await context.send("direct:bare", "x")
        assert isinstance(second.exception, CircuitOpenError)

    run_routes(routes, scenario)


def test_load_balance_round_robin_weighted_and_failover() -> None:
    def down(exchange: Exchange) -> None:
        raise ConnectionError("down")

    routes = [
        from_("direct:rr", id="rr").load_balance().to("mock:a").to("mock:b").end().build(),
        from_("direct:w", id="w")
        .load_balance("weighted", (3, 1))
        .to("mock:w3")
        .to("mock:w1")
        .end()
        .build(),
        from_("direct:f", id="f")
        .load_balance("failover")
        .process(down)
        .to("mock:backup")
        .end()
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        for i in range(4):
            await context.send("direct:rr", i)
        assert mock_endpoint(context, "mock:a").bodies == [0, 2]
        assert mock_endpoint(context, "mock:b").bodies == [1, 3]
        for i in range(8):
            await context.send("direct:w", i)
        assert len(mock_endpoint(context, "mock:w3").received) == 6
        assert len(mock_endpoint(context, "mock:w1").received) == 2
        result = await context.send("direct:f", "x")
        assert result.exception is None
        assert mock_endpoint(context, "mock:backup").bodies == ["x"]

    run_routes(routes, scenario)


def test_idempotent_consumer_skips_duplicates_and_forgets_failures() -> None:
    attempts = 0

    def flaky(exchange: Exchange) -> None:
        nonlocal attempts
        if exchange.body["id"] == "bad":
            attempts += 1
        if exchange.body["id"] == "bad" and attempts < 2:
            raise ConnectionError("try again")

    route = (
        from_("direct:in", id="r")
        .idempotent_consumer("id")
        .process(flaky)
        .to("mock:once")
        .end()
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        for key in ("a", "b", "a", "a"):
            await context.send("direct:in", {"id": key})
        assert mock_endpoint(context, "mock:once").bodies == [{"id": "a"}, {"id": "b"}]
        first = await context.send("direct:in", {"id": "bad"})
        assert first.exception is not None
        # The failed message's key was forgotten: its redelivery is processed.
        await context.send("direct:in", {"id": "bad"})
        assert mock_endpoint(context, "mock:once").bodies[-1] == {"id": "bad"}
        missing = await context.send("direct:in", {"other": 1})
        assert "gave no message id" in str(missing.exception)

    run_routes([route], scenario)


def test_log_step_renders_its_template(caplog: pytest.LogCaptureFixture) -> None:
    route = from_("direct:in", id="orders").log("order {{ body.id }} for {{ headers.who }}").build()

    async def scenario(context: IntegrationContext) -> None:
        with caplog.at_level(logging.INFO, logger="meshgate.integration.route.orders"):
            await context.send("direct:in", {"id": 7}, {"who": "ada"})

    run_routes([route], scenario)
    assert "order 7 for ada" in caplog.messages
