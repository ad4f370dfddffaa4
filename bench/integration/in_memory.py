"""Exchanges per second through an in-memory route: direct -> choice -> transform -> mock.

The peer is the same work written as a plain coroutine (JMESPath compiled once, the
Jinja2 template rendered, the result appended to a list), so the ratio is the cost of
the runtime itself. Not a pass/fail test; run pinned to one core:

    taskset -c 0 .venv/bin/python bench/integration/in_memory.py
"""

from __future__ import annotations

import asyncio
import time

import jmespath
from jinja2.sandbox import ImmutableSandboxedEnvironment

from meshgate.integration import Exchange, IntegrationContext, Message, from_
from meshgate.integration.testing import mock_endpoint

COUNT = 50_000
BODIES = [{"id": str(i), "total": i % 2000} for i in range(100)]


async def through_the_runtime() -> float:
    route = (
        from_("direct:orders", id="orders")
        .choice()
        .when("total > `1000`")
        .set_header("priority", "high")
        .otherwise()
        .set_header("priority", "low")
        .end()
        .transform(template='{"accepted": true, "id": "{{ body.id }}"}')
        .to("mock:out")
        .build()
    )
    context = IntegrationContext()
    context.add_route(route)
    await context.start()
    producer = await context.dynamic_producer("direct:orders")

    started = time.perf_counter()
    for i in range(COUNT):
        await producer.process(Exchange(Message(BODIES[i % 100], {})))
    elapsed = time.perf_counter() - started
    assert len(mock_endpoint(context, "mock:out").received) == COUNT
    await context.stop()
    return COUNT / elapsed


async def by_hand() -> float:
    predicate = jmespath.compile("total > `1000`")
    template = ImmutableSandboxedEnvironment().from_string(
        '{"accepted": true, "id": "{{ body.id }}"}'
    )
    out: list[tuple[dict[str, str], str]] = []

    async def handle(body: dict[str, object]) -> None:
        headers = {"priority": "high" if predicate.search(body) else "low"}
        out.append((headers, template.render(body=body, headers=headers)))

    started = time.perf_counter()
    for i in range(COUNT):
        await handle(BODIES[i % 100])
    elapsed = time.perf_counter() - started
    assert len(out) == COUNT
    return COUNT / elapsed


def main() -> None:
    runtime = asyncio.run(through_the_runtime())
    plain = asyncio.run(by_hand())
    print(f"route (direct, choice, transform, mock): {runtime:,.0f} exchanges/s")
    print(f"the same work by hand:                   {plain:,.0f} exchanges/s")
    print(f"runtime / by hand:                       {runtime / plain:.2f}x")


if __name__ == "__main__":
    main()
