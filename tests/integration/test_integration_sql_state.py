"""Aggregation and idempotency state in SQL tables, on a real PostgreSQL
(``MESHGATE_DATABASE_URL``, a schema per test) and on SQLite: surviving a restart and
shared by concurrent runtimes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from integration_kit import run, run_sql

from meshgate.integration import IntegrationContext, Route, from_
from meshgate.integration._errors import DefinitionError, IntegrationError
from meshgate.integration._sql_state import (
    SqlAggregationRepository,
    SqlIdempotentRepository,
)
from meshgate.integration._yaml import parse_routes
from meshgate.integration.testing import mock_endpoint


def aggregating(repository: str, **options: Any) -> Route:
    return (
        from_("direct:in", id="agg")
        .aggregate("headers.batch", repository=repository, strategy="collect", **options)
        .to("mock:batch")
        .end()
        .build()
    )


async def started(route: Route, db: str) -> IntegrationContext:
    context = IntegrationContext(settings={"database_url": db})
    context.add_route(route)
    await context.start()
    return context


def test_aggregation_state_survives_a_restart(db: str) -> None:
    async def main() -> None:
        first = await started(aggregating("sql", completion_size=3), db)
        await first.send("direct:in", b"\x00one", {"batch": "b1"})
        await first.send("direct:in", {"n": 2}, {"batch": "b1"})
        await first.send("direct:in", "other", {"batch": "b2"})
        await first.stop()
        assert mock_endpoint(first, "mock:batch").received == []

        second = await started(aggregating("sql", completion_size=3), db)
        await second.send("direct:in", "three", {"batch": "b1"})
        batches = mock_endpoint(second, "mock:batch").received
        await second.stop()
        assert [b.message.body for b in batches] == [[b"\x00one", {"n": 2}, "three"]]
        assert batches[0].message.headers == {"batch": "b1"}

    run(main)
    assert run_sql(db, "select key from meshgate_aggregation_groups") == [("b2",)]
    assert len(run_sql(db, "select id from meshgate_aggregation_items")) == 1


def test_a_timeout_pending_at_a_restart_still_completes(db: str) -> None:
    async def main() -> None:
        first = await started(aggregating(db, completion_timeout="150ms"), db)
        await first.send("direct:in", {"k": "x"}, {"batch": "late"})
        await first.stop()
        second = await started(aggregating(db, completion_timeout="150ms"), db)
        late = await mock_endpoint(second, "mock:batch").wait_for(1, timeout=2)
        assert late[0].properties["aggregated_completed_by"] == "timeout"
        assert late[0].message.body == [{"k": "x"}]
        await second.stop()

    run(main)


def test_concurrent_runtimes_lose_no_item_and_release_a_group_once(db: str) -> None:
    groups, per_runtime = 4, 6

    async def main() -> None:
        route = aggregating("sql", completion_size=2 * per_runtime)
        contexts = [await started(route, db), await started(route, db)]
        await asyncio.gather(
            *(
                context.send("direct:in", f"{c}-{i}", {"batch": f"g{g}"})
                for c, context in enumerate(contexts)
                for g in range(groups)
                for i in range(per_runtime)
            )
        )
        batches = [b for c in contexts for b in mock_endpoint(c, "mock:batch").received]
        for context in contexts:
            await context.stop()
        assert len(batches) == groups
        for batch in batches:
            expected = {f"{c}-{i}" for c in range(2) for i in range(per_runtime)}
            assert sorted(batch.message.body) == sorted(expected)

    run(main)
    assert run_sql(db, "select count(*) from meshgate_aggregation_items") == [(0,)]


def test_of_concurrent_takes_one_gets_the_group(db: str) -> None:
    async def main() -> None:
        first = SqlAggregationRepository(db, "race")
        second = SqlAggregationRepository(db, "race")
        try:
            keys = [f"k{i}" for i in range(10)]
            for key in keys:
                await first.add(key, {"body": key})
            assert set(await second.groups()) == set(keys)
            taken = await asyncio.gather(
                *(repo.take(key) for key in keys for repo in (first, second))
            )
            assert sorted(item["body"] for items in taken for item in items) == keys
            assert await first.groups() == {}
        finally:
            await first.close()
            await second.close()

    run(main)


def test_sql_idempotency_is_shared_between_runtimes(db: str) -> None:
    route = (
        from_("direct:in", id="idem")
        .idempotent_consumer("id", repository=db, ttl="10s")
        .to("mock:once")
        .end()
        .build()
    )

    async def main() -> None:
        contexts = [await started(route, db) for _ in range(2)]
        await asyncio.gather(
            *(c.send("direct:in", {"id": key}) for c in contexts for key in ("a", "b", "a", "b"))
        )
        total = sum(len(mock_endpoint(c, "mock:once").received) for c in contexts)
        for context in contexts:
            await context.stop()
        assert total == 2

    run(main)


def test_idempotent_keys_expire_are_removed_and_may_be_long(db: str) -> None:
    long_key = "x" * 5000
    hostile = "k'); drop table meshgate_idempotent; --"

    async def main() -> None:
        repository = SqlIdempotentRepository(db, "p" * 400, ttl=60)
        other = SqlIdempotentRepository(db, "another route")
        try:
            assert await repository.add("a") is True
            assert await repository.add("a") is False
            assert await other.add("a") is True
            assert await repository.add(long_key) is True
            assert await repository.add(long_key) is False
            assert await repository.add(long_key[:-1] + "y") is True
            assert await repository.add(hostile) is True
            assert await repository.add(hostile) is False
            await repository.remove("a")
            assert await repository.add("a") is True
            # One minute later (the row's time moved back): the key counts as new.
            run_sql(db, "update meshgate_idempotent set created = created - 61 where key = 'a'")
            assert await repository.add("a") is True
            assert await other.add("a") is False
        finally:
            await repository.close()
            await other.close()

    run(main)


def test_a_failed_exchange_does_not_count_as_a_duplicate(db: str) -> None:
    calls: list[str] = []

    def fail_first(exchange: Any) -> None:
        calls.append(exchange.message.body["id"])
        if len(calls) == 1:
            raise RuntimeError("not yet")

    route = (
        from_("direct:in", id="idem")
        .idempotent_consumer("id", repository="sql")
        .process(fail_first)
        .to("mock:done")
        .end()
        .build()
    )

    async def main() -> None:
        context = await started(route, db)
        assert (await context.send("direct:in", {"id": "m1"})).exception is not None
        assert (await context.send("direct:in", {"id": "m1"})).exception is None
        assert (await context.send("direct:in", {"id": "m1"})).properties.get("duplicate")
        await context.stop()
        assert len(mock_endpoint(context, "mock:done").received) == 1

    run(main)


def test_repository_settings_are_checked() -> None:
    parse_routes(
        """
routes:
  - id: a
    from: direct:a
    steps:
      - idempotent_consumer: {expr: id, repository: "sqlite:///state.db", steps: [{to: "mock:a"}]}
      - aggregate:
          correlation: id
          completion_size: 2
          repository: sql
          steps: [{to: "mock:b"}]
"""
    )
    with pytest.raises(DefinitionError, match="must be memory, redis, a redis:// URL, sql"):
        parse_routes(
            """
routes:
  - id: a
    from: direct:a
    steps:
      - idempotent_consumer: {expr: id, repository: "mongodb://x", steps: [{to: "mock:a"}]}
"""
        )
    context = IntegrationContext()
    with pytest.raises(DefinitionError, match="repository 'sql' needs the database_url setting"):
        context.add_route(aggregating("sql", completion_size=2))
    with pytest.raises(IntegrationError, match="'postgresql:/x' is not a database URL"):
        SqlIdempotentRepository("postgresql:/x", "p")


def test_an_unreachable_database_fails_the_exchange_clearly() -> None:
    route = (
        from_("direct:in", id="down")
        .idempotent_consumer("id", repository="postgresql://postgres@127.0.0.1:1/test")
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
        assert "idempotent repository (SQL)" in str(result.exception)
        assert "127.0.0.1" in str(result.exception)

    run(main)
