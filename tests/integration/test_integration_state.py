"""Aggregation and idempotency state in a real Redis: shared, and surviving a restart."""

from __future__ import annotations

import asyncio

from integration_kit import run

from meshgate.integration import IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint


def test_aggregation_state_survives_a_restart(redis_url: str, redis_prefix: str) -> None:
    def route() -> object:
        return (
            from_("direct:in", id=f"agg-{redis_prefix}")
            .aggregate("headers.batch", completion_size=3, repository="redis", strategy="collect")
            .to("mock:batch")
            .end()
            .build()
        )

    async def main() -> None:
        first = IntegrationContext(settings={"redis_url": redis_url})
        first.add_route(route())  # type: ignore[arg-type]
        await first.start()
        await first.send("direct:in", b"one", {"batch": "b1"})
        await first.send("direct:in", {"n": 2}, {"batch": "b1"})
        await first.stop()
        assert mock_endpoint(first, "mock:batch").received == []

        second = IntegrationContext(settings={"redis_url": redis_url})
        second.add_route(route())  # type: ignore[arg-type]
        await second.start()
        await second.send("direct:in", "three", {"batch": "b1"})
        batches = mock_endpoint(second, "mock:batch").received
        await second.stop()
        assert [b.body for b in batches] == [[b"one", {"n": 2}, "three"]]
        assert batches[0].headers == {"batch": "b1"}

    run(main)


def test_a_timeout_pending_at_a_restart_still_completes(redis_url: str, redis_prefix: str) -> None:
    def route() -> object:
        return (
            from_("direct:in", id=f"late-{redis_prefix}")
            .aggregate("k", completion_timeout="150ms", repository="redis")
            .to("mock:late")
            .end()
            .build()
        )

    async def main() -> None:
        first = IntegrationContext(settings={"redis_url": redis_url})
        first.add_route(route())  # type: ignore[arg-type]
        await first.start()
        await first.send("direct:in", {"k": "x"})
        await first.stop()
        second = IntegrationContext(settings={"redis_url": redis_url})
        second.add_route(route())  # type: ignore[arg-type]
        await second.start()
        late = await mock_endpoint(second, "mock:late").wait_for(1, timeout=2)
        assert late[0].properties["aggregated_completed_by"] == "timeout"
        await second.stop()

    run(main)


def test_redis_idempotency_is_shared_between_runtimes(redis_url: str, redis_prefix: str) -> None:
    def route() -> object:
        return (
            from_("direct:in", id=f"idem-{redis_prefix}")
            .idempotent_consumer("id", repository="redis", ttl="10s")
            .to("mock:once")
            .end()
            .build()
        )

    async def main() -> None:
        contexts = []
        for _ in range(2):
            context = IntegrationContext(settings={"redis_url": redis_url})
            context.add_route(route())  # type: ignore[arg-type]
            await context.start()
            contexts.append(context)
        await asyncio.gather(
            *(c.send("direct:in", {"id": key}) for c in contexts for key in ("a", "b", "a"))
        )
        total = sum(len(mock_endpoint(c, "mock:once").received) for c in contexts)
        for context in contexts:
            await context.stop()
        assert total == 2

    run(main)


def test_an_unreachable_redis_fails_the_exchange_clearly(redis_prefix: str) -> None:
    route = (
        from_("direct:in", id=f"down-{redis_prefix}")
        .idempotent_consumer("id", repository="redis://127.0.0.1:1/0")
        .to("mock:x")
        .end()
        .build()
    )

    async def main() -> None:
        context = IntegrationContext()
        context.add_route(route)
        await context.start()
        result = await context.send("direct:in", {"id": 1})
        await context.stop()
        assert "idempotent repository (Redis)" in str(result.exception)

    run(main)


def test_a_route_restarted_closes_and_reopens_its_redis_idempotency(
    redis_url: str, redis_prefix: str
) -> None:
    import redis

    name = f"mg-idem-{redis_prefix}"
    route_id = f"restart-{redis_prefix}"

    def connections() -> int:
        # The repository's connections, told apart by the client name in its URL.
        with redis.Redis.from_url(redis_url) as admin:
            return sum(1 for c in admin.client_list() if c.get("name") == name)

    async def main() -> None:
        sep = "&" if "?" in redis_url else "?"
        context = IntegrationContext()
        context.add_route(
            from_("direct:in", id=route_id)
            .idempotent_consumer("id", repository=f"{redis_url}{sep}client_name={name}")
            .to("mock:once")
            .end()
            .build()
        )
        await context.start()
        await context.send("direct:in", {"id": "a"})
        assert connections() == 1
        await context.stop_route(route_id)
        assert connections() == 0  # closed with its route
        await context.start_route(route_id)
        await context.send("direct:in", {"id": "a"})  # a duplicate: the key is in Redis
        await context.send("direct:in", {"id": "b"})
        assert [m.body for m in mock_endpoint(context, "mock:once").received] == [
            {"id": "a"},
            {"id": "b"},
        ]
        await context.stop()
        assert connections() == 0

    run(main)
