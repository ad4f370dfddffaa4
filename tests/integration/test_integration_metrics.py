"""Per-route and per-step metrics: exchanges, failures and latency, in Prometheus text."""

from __future__ import annotations

from integration_kit import run_routes
from prometheus_client.parser import text_string_to_metric_families

from meshgate.integration import ErrorHandler, IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(context: IntegrationContext) -> Samples:
    text = context.metrics.render().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _at(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_every_route_and_step_counts_its_exchanges() -> None:
    route = (
        from_("direct:orders", id="orders")
        .choice()
        .when("total > `1000`")
        .set_header("priority", "high")
        .otherwise()
        .set_header("priority", "low")
        .end()
        .to("mock:out")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        for total in (5000, 10, 20):
            await context.send("direct:orders", {"total": total})
        assert len(mock_endpoint(context, "mock:out").received) == 3
        s = _samples(context)
        route_total = "meshgate_integration_route_exchanges_total"
        assert _at(s, route_total, route="orders") == 3
        assert _at(s, "meshgate_integration_route_failures_total", route="orders") == 0
        assert _at(s, "meshgate_integration_route_duration_seconds_count", route="orders") == 3
        step_total = "meshgate_integration_step_exchanges_total"
        when = "steps[0].choice.when[0].steps[0].set_header"
        otherwise = "steps[0].choice.otherwise[0].set_header"
        assert _at(s, step_total, route="orders", step="steps[0].choice") == 3
        assert _at(s, step_total, route="orders", step=when) == 1
        assert _at(s, step_total, route="orders", step=otherwise) == 2
        assert _at(s, step_total, route="orders", step="steps[1].to") == 3
        assert context.route_stats("orders") == {"inflight": 0, "completed": 3, "failed": 0}

    run_routes([route], scenario)


def test_a_failure_counts_at_its_step_and_route_even_when_dead_lettered() -> None:
    def refuse(exchange: object) -> None:
        raise ValueError("no")

    route = (
        from_(
            "direct:in",
            id="failing",
            error_handler=ErrorHandler(
                dead_letter="mock:dead", maximum_redeliveries=2, delay=0.001
            ),
        )
        .log("in")
        .process(refuse)
        .to("mock:never")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", "x")
        assert len(mock_endpoint(context, "mock:dead").received) == 1
        s = _samples(context)
        assert _at(s, "meshgate_integration_route_failures_total", route="failing") == 1
        assert _at(s, "meshgate_integration_route_exchanges_total", route="failing") == 1
        failures = "meshgate_integration_step_failures_total"
        assert _at(s, failures, route="failing", step="steps[1].process") == 1
        assert _at(s, failures, route="failing", step="steps[0].log") == 0
        # The redeliveries are one exchange at the step, not three.
        total = "meshgate_integration_step_exchanges_total"
        assert _at(s, total, route="failing", step="steps[1].process") == 1
        assert _at(s, total, route="failing", step="steps[2].to") == 0
        assert context.route_stats("failing")["failed"] == 1

    run_routes([route], scenario)


def test_latency_lands_in_the_buckets_of_its_duration() -> None:
    route = from_("direct:slow", id="slow").delay("30ms").build()

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:slow", "x")
        s = _samples(context)
        name = "meshgate_integration_step_duration_seconds"
        where = {"route": "slow", "step": "steps[0].delay"}
        assert _at(s, f"{name}_bucket", le="0.025", **where) == 0
        assert _at(s, f"{name}_bucket", le="0.05", **where) == 1
        assert _at(s, f"{name}_bucket", le="+Inf", **where) == 1
        assert 0.03 <= (_at(s, f"{name}_sum", **where) or 0) < 0.05
        route_sum = _at(s, "meshgate_integration_route_duration_seconds_sum", route="slow")
        assert route_sum is not None and route_sum >= 0.03

    run_routes([route], scenario)


def test_a_synchronous_step_failing_in_a_pipeline_counts_and_stops_it() -> None:
    route = (
        from_("direct:in", id="parse")
        .set_header("stage", "parsing")
        .unmarshal("json")
        .validate(expr="id")
        .to("mock:parsed")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        bad = await context.send("direct:in", b"{oops")
        assert bad.failed_step == "steps[1].unmarshal"
        no_id = await context.send("direct:in", b'{"total": 1}')
        assert no_id.failed_step == "steps[2].validate"
        await context.send("direct:in", b'{"id": 1}')
        assert [m.body for m in mock_endpoint(context, "mock:parsed").received] == [{"id": 1}]
        s = _samples(context)
        failures = "meshgate_integration_step_failures_total"
        total = "meshgate_integration_step_exchanges_total"
        assert _at(s, failures, route="parse", step="steps[1].unmarshal") == 1
        assert _at(s, total, route="parse", step="steps[1].unmarshal") == 3
        assert _at(s, failures, route="parse", step="steps[2].validate") == 1
        assert _at(s, total, route="parse", step="steps[3].to") == 1
        assert _at(s, "meshgate_integration_route_failures_total", route="parse") == 2

    run_routes([route], scenario)
