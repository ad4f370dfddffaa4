"""The redis streams connector against a real Redis: XADD, consumer groups, XACK at least once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_kit import (
    dead_lettered_once,
    killed_mid_route_then_restarted,
    redelivered_after_one_failure,
    run_routes,
)

from meshgate.integration import IntegrationContext, from_
from meshgate.integration._errors import EndpointError
from meshgate.integration.testing import mock_endpoint


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    """A stream name prefix of this test alone; its streams are deleted afterwards."""
    import redis

    name = f"meshgate-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _pending(redis_url: str, stream: str, group: str) -> int:
    """Entries delivered to the group and not acknowledged."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()


def test_a_route_consumes_transforms_and_appends(redis_url: str, stream: str) -> None:
    routes = [
        from_("direct:in", id="publish").to(f"redis:{stream}.in").build(),
        from_(f"redis:{stream}.in?group=orders", id="transform")
        .unmarshal("json")
        .transform(template='{"total": {{ body.total * 2 }}}')
        .to(f"redis:{stream}.out")
        .build(),
        from_(f"redis:{stream}.out?group=audit", id="out").to("mock:out").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"total": 21}, {"tenant": "acme"})
        received = (await mock_endpoint(context, "mock:out").wait_for(1))[0]
        assert received.body == b'{"total": 42}'
        assert received.headers["tenant"] == "acme"
        assert received.headers["content-type"] == "application/json"
        assert received.headers["redis_stream"] == f"{stream}.out"
        await asyncio.sleep(0.05)
        assert _pending(redis_url, f"{stream}.in", "orders") == 0

    run_routes(routes, scenario, settings={"redis_url": redis_url})


def test_an_entry_without_a_body_field_is_a_mapping(redis_url: str, stream: str) -> None:
    import redis

    routes = [from_(f"redis:{stream}?group=g", id="consume").to("mock:out").build()]

    async def scenario(context: IntegrationContext) -> None:
        client = redis.Redis.from_url(redis_url)
        client.xadd(stream, {"sku": "A-1", "quantity": "3"})
        client.close()
        received = (await mock_endpoint(context, "mock:out").wait_for(1))[0]
        assert received.body == {"sku": "A-1", "quantity": "3"}

    run_routes(routes, scenario, settings={"redis_url": redis_url})


def test_a_failed_entry_is_claimed_again(redis_url: str, stream: str) -> None:
    async def settled() -> None:
        assert _pending(redis_url, stream, "g") == 0

    received = redelivered_after_one_failure(
        f"redis:{stream}",
        f"redis:{stream}?group=g&claim_idle=100ms",
        {"redis_url": redis_url},
        settled,
    )
    assert received.properties["redelivered"] is True


def test_the_dead_letter_channel_ends_redelivery(redis_url: str, stream: str) -> None:
    async def settled() -> None:
        assert _pending(redis_url, stream, "g") == 0

    dead_lettered_once(
        f"redis:{stream}",
        f"redis:{stream}?group=g&claim_idle=100ms",
        f"redis:{stream}.dead",
        f"redis:{stream}.dead?group=g",
        {"redis_url": redis_url},
        settled,
    )


def test_stopping_drains_the_exchange_in_flight(redis_url: str, stream: str) -> None:
    routes = [from_(f"redis:{stream}?group=g", id="slow").delay("300ms").to("mock:out").build()]

    async def main() -> None:
        context = IntegrationContext(settings={"redis_url": redis_url})
        context.add_routes(routes)
        await context.start()
        await context.send(f"redis:{stream}", b"m")
        await asyncio.sleep(0.15)
        await context.stop(grace=5.0)
        assert mock_endpoint(context, "mock:out").bodies == [b"m"]

    asyncio.run(asyncio.wait_for(main(), 30))
    assert _pending(redis_url, stream, "g") == 0


def test_bad_uris_are_clear_errors(redis_url: str) -> None:
    context = IntegrationContext(settings={"redis_url": redis_url})
    with pytest.raises(EndpointError, match="unknown option 'prefetch'"):
        context.endpoint("redis:orders?prefetch=3")
    with pytest.raises(EndpointError, match="option 'group_start' must be one of latest"):
        context.endpoint("redis:orders?group_start=first")
    with pytest.raises(EndpointError, match="write redis:STREAM"):
        context.endpoint("redis:")
    with pytest.raises(EndpointError, match=r"consume with a group: redis:STREAM\?group=NAME"):
        context.endpoint("redis:orders").create_consumer(lambda exchange: asyncio.sleep(0))


@pytest.mark.parametrize("restarted_as", ["same", "other"])
def test_a_runtime_killed_mid_route_loses_nothing(
    redis_url: str, stream: str, tmp_path: Path, restarted_as: str
) -> None:
    """Restarted under its own consumer name it takes its entry back at once; under another
    name, XAUTOCLAIM takes it once idle."""
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"

    def write_routes(consumer: str) -> None:
        routes.write_text(
            f"""
redis_url: "{redis_url}"
routes:
  - id: slow
    from: "redis:{stream}?group=g&consumer={consumer}&claim_idle=500ms"
    steps:
      - delay: 300ms
      - log: "done {{{{ body }}}}"
"""
        )

    def restart_as() -> None:
        assert _pending(redis_url, stream, "g") == 1
        write_routes("first" if restarted_as == "same" else "second")

    write_routes("first")
    killed_mid_route_then_restarted(
        routes, log_path, f"redis:{stream}", {"redis_url": redis_url}, between=restart_as
    )
    assert _pending(redis_url, stream, "g") == 0
    assert log_path.read_text().count("done precious") == 1
