"""Routes continue a trace in process (direct, seda) and over HTTP, checked at a real
OTLP/HTTP receiver; the trace headers a send put on a message do not stay on it."""

from __future__ import annotations

import asyncio
import time

from harness import free_port
from otlp_receiver import OtlpReceiver

from meshgate.config.tracing import TracingSettings
from meshgate.integration import IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint
from meshgate.telemetry.tracing import Tracing

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_routes_carry_one_trace_in_process_and_over_http() -> None:
    with OtlpReceiver() as receiver:
        tracing = Tracing(
            TracingSettings(enabled=True, endpoint=receiver.endpoint, sample_rate=1.0),
            "routes",
            schedule_delay=0.05,
        )
        port = free_port()
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{port}"}, tracing=tracing)
        context.add_routes(
            [
                from_("direct:start", id="caller")
                .to(f"http://127.0.0.1:{port}/in")
                .to("mock:after")
                .build(),
                from_("http:/in", id="callee").to("seda:later").build(),
                from_("seda:later", id="later").to("mock:later").build(),
            ]
        )

        async def scenario() -> None:
            await context.start()
            try:
                reply = await context.request(
                    "direct:start", body="x", headers={"traceparent": CALLER, "tracestate": "a=1"}
                )
                # The callee's reply does not echo the trace fields it was called with.
                assert "traceparent" not in reply.headers
                later = mock_endpoint(context, "mock:later")
                deadline = time.monotonic() + 10
                while not later.received and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert later.received
                # The callee got the send's context, tracestate passed on.
                got = later.received[0].headers
                assert got["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                assert got["tracestate"] == "a=1"
            finally:
                await context.stop()

        asyncio.run(scenario())
        spans = receiver.wait_for(4)
        tracing.shutdown()
    assert {s.trace_id for s in spans} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    named = {s.name: s for s in spans}
    assert set(named) == {"route caller", f"send http://127.0.0.1:{port}/in", "route callee"} | {
        "route later"
    }, spans
    caller, send = named["route caller"], named[f"send http://127.0.0.1:{port}/in"]
    callee, later_span = named["route callee"], named["route later"]
    assert caller.parent_id == "00f067aa0ba902b7" and caller.kind == "internal"
    assert send.parent_id == caller.span_id and send.kind == "client"
    assert callee.parent_id == send.span_id and callee.kind == "server"
    assert later_span.parent_id == callee.span_id and later_span.kind == "internal"
    assert not any(s.error for s in spans)
