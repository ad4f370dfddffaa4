"""Behaviour every counter backend shares, run against memory and Redis alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from meshgate.limits import (
    CounterBackend,
    Decision,
    LimitCheck,
    MemoryCounters,
    RedisCounters,
    Usage,
    create_backend,
)

Run = Callable[[Callable[[CounterBackend], Awaitable[None]]], None]

# 2031-03-05 10:20:00 UTC, the start of a minute, inside no edge of a larger window.
T0 = int(datetime(2031, 3, 5, 10, 20, tzinfo=UTC).timestamp())


def values(decision: Decision) -> list[int]:
    return [usage.value for usage in decision.usages]


def test_allows_up_to_max_then_refuses(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        check = [LimitCheck("hits", "minute", 3, 1)]
        for expected in (1, 2, 3):
            decision = await backend.check_and_increment("p/app", check, now=T0 + 10.25)
            assert decision.allowed and decision.rejected is None
            assert decision.usages == [Usage("hits", "minute", 3, expected, 3 - expected, 50)]
        refused = await backend.check_and_increment("p/app", check, now=T0 + 11)
        assert not refused.allowed
        assert refused.usages == [Usage("hits", "minute", 3, 3, 0, 49)]
        assert refused.rejected is refused.usages[0]

    with_backend(scenario)


def test_a_refused_request_increments_none_of_its_checks(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        checks = [
            LimitCheck("hits", "minute", 10, 1),
            LimitCheck("hits", "day", 2, 1),
            LimitCheck("hits", "month", 10, 1),
        ]
        for _ in range(2):
            assert (await backend.check_and_increment("p/app", checks, now=T0)).allowed
        refused = await backend.check_and_increment("p/app", checks, now=T0)
        assert not refused.allowed
        assert values(refused) == [2, 2, 2]
        assert refused.rejected is refused.usages[1]
        assert (refused.rejected.period, refused.rejected.remaining) == ("day", 0)
        assert [u.value for u in await backend.usage("p/app", checks, now=T0)] == [2, 2, 2]

        # The first refusing check is reported even when a later one also refuses.
        tight = [LimitCheck("hits", "month", 2, 1), LimitCheck("hits", "day", 2, 1)]
        refused = await backend.check_and_increment("p/app", tight, now=T0)
        assert refused.rejected is refused.usages[0]
        assert refused.rejected.period == "month"

    with_backend(scenario)


def test_parent_and_child_metrics(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        search = [LimitCheck("hits", "minute", 10, 3), LimitCheck("search", "minute", 2, 1)]
        assert values(await backend.check_and_increment("p/app", search, now=T0)) == [3, 1]
        assert values(await backend.check_and_increment("p/app", search, now=T0)) == [6, 2]
        refused = await backend.check_and_increment("p/app", search, now=T0)
        assert not refused.allowed and refused.rejected is refused.usages[1]
        assert values(refused) == [6, 2]

        other = [LimitCheck("hits", "minute", 10, 3), LimitCheck("browse", "minute", 5, 1)]
        assert values(await backend.check_and_increment("p/app", other, now=T0)) == [9, 1]
        refused = await backend.check_and_increment("p/app", other, now=T0)
        assert refused.rejected is refused.usages[0] and values(refused) == [9, 1]

    with_backend(scenario)


def test_the_same_counter_twice_in_one_request_adds_up(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        twice = [LimitCheck("hits", "minute", 3, 1), LimitCheck("hits", "minute", 3, 1)]
        assert values(await backend.check_and_increment("p/app", twice, now=T0)) == [2, 2]
        refused = await backend.check_and_increment("p/app", twice, now=T0)
        assert not refused.allowed and refused.rejected is refused.usages[1]
        assert values(refused) == [2, 2]

    with_backend(scenario)


def test_increment_zero_reports_without_counting_or_refusing(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        await backend.check_and_increment("p/app", [LimitCheck("hits", "hour", 2, 2)], now=T0)
        peek = [LimitCheck("hits", "hour", 2, 0), LimitCheck("other", "hour", 0, 0)]
        for _ in range(3):
            decision = await backend.check_and_increment("p/app", peek, now=T0)
            assert decision.allowed
            assert values(decision) == [2, 0]
            assert [u.remaining for u in decision.usages] == [0, 0]

    with_backend(scenario)


def test_limit_zero_refuses_every_increment(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        checks = [LimitCheck("hits", "day", 100, 1), LimitCheck("uploads", "day", 0, 1)]
        refused = await backend.check_and_increment("p/app", checks, now=T0)
        assert not refused.allowed
        assert refused.rejected == Usage("uploads", "day", 0, 0, 0, 49200)
        assert values(refused) == [0, 0]

    with_backend(scenario)


def test_eternity_never_resets(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        check = [LimitCheck("signups", "eternity", 2, 1)]
        first = await backend.check_and_increment("p/app", check, now=T0)
        assert first.usages == [Usage("signups", "eternity", 2, 1, 1, None)]
        years_later = T0 + 10 * 365 * 86400
        assert (await backend.check_and_increment("p/app", check, now=years_later)).allowed
        refused = await backend.check_and_increment("p/app", check, now=years_later + 1)
        assert not refused.allowed and refused.usages[0].value == 2

    with_backend(scenario)


def test_a_new_window_starts_from_zero(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        per_minute = [LimitCheck("hits", "minute", 2, 1)]
        for _ in range(2):
            await backend.check_and_increment("p/app", per_minute, now=T0 + 59.9)
        last = await backend.check_and_increment("p/app", per_minute, now=T0 + 59.9)
        assert not last.allowed and last.usages[0].reset_seconds == 1
        rolled = await backend.check_and_increment("p/app", per_minute, now=T0 + 60)
        assert rolled.allowed and rolled.usages[0].value == 1
        assert rolled.usages[0].reset_seconds == 60
        # The older window is still what it was for a caller whose clock lags.
        (lagging,) = await backend.usage("p/app", per_minute, now=T0 + 30)
        assert lagging.value == 2

        new_year_eve = int(datetime(2031, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp())
        per_month = [LimitCheck("hits", "month", 1, 1), LimitCheck("hits", "year", 5, 1)]
        assert (await backend.check_and_increment("p/app", per_month, now=new_year_eve)).allowed
        refused = await backend.check_and_increment("p/app", per_month, now=new_year_eve + 29)
        assert refused.rejected is refused.usages[0]
        assert [u.reset_seconds for u in refused.usages] == [1, 1]
        january = await backend.check_and_increment("p/app", per_month, now=new_year_eve + 30)
        assert january.allowed and values(january) == [1, 1]
        assert january.usages[0].reset_seconds == 31 * 86400

    with_backend(scenario)


def test_usage_reads_without_counting(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        checks = [LimitCheck("hits", "minute", 5, 1), LimitCheck("hits", "eternity", 9, 4)]
        assert await backend.usage("p/app", checks, now=T0) == [
            Usage("hits", "minute", 5, 0, 5, 60),
            Usage("hits", "eternity", 9, 0, 9, None),
        ]
        await backend.check_and_increment("p/app", checks, now=T0)
        for _ in range(3):
            assert [u.value for u in await backend.usage("p/app", checks, now=T0)] == [1, 4]
        assert (await backend.check_and_increment("p/app", checks, now=T0)).allowed
        assert await backend.usage("p/app", [], now=T0) == []

    with_backend(scenario)


def test_scopes_are_independent(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        check = [LimitCheck("hits", "day", 1, 1)]
        assert (await backend.check_and_increment("p/app1", check, now=T0)).allowed
        assert not (await backend.check_and_increment("p/app1", check, now=T0)).allowed
        assert (await backend.check_and_increment("p/app2", check, now=T0)).allowed
        assert (await backend.check_and_increment("other/app1", check, now=T0)).allowed

    with_backend(scenario)


HOSTILE_PAIRS = [
    # (scope, metric) pairs that would meet in one key if parts were joined naively.
    ("a:b", "c"),
    ("a", "b:c"),
    ("a", "b%3Ac"),
    ("{a}", "b"),
    ("a", "}b{"),
    ("a}:b", "c"),
    ("a", "b}:c"),
    ("p app", "hits per day"),
    ("prodüct/äpp", "métrique ✓"),
    ("p/\ud800", "hits"),
    ("x" * 10_000, "hits"),
    ("x" * 9_999 + "y", "hits"),
    ("x" * 10_000, "hits" * 3000),
    ("p", "'); redis.call('FLUSHALL'); --"),
    ("", ""),
]


def test_hostile_names_never_share_a_counter(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        for scope, metric in HOSTILE_PAIRS:
            checks = [LimitCheck(metric, "day", 1, 1), LimitCheck(metric, "eternity", 1, 1)]
            decision = await backend.check_and_increment(scope, checks, now=T0)
            assert decision.allowed, (scope[:20], metric[:20])
            assert values(decision) == [1, 1]
        for scope, metric in HOSTILE_PAIRS:
            checks = [LimitCheck(metric, "day", 1, 1)]
            assert [u.value for u in await backend.usage(scope, checks, now=T0)] == [1]
            assert not (await backend.check_and_increment(scope, checks, now=T0)).allowed

    with_backend(scenario)


def test_concurrent_requests_never_exceed_the_limit(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        check = [LimitCheck("hits", "minute", 100, 1)]
        decisions = await asyncio.gather(
            *(backend.check_and_increment("p/app", check, now=T0) for _ in range(500))
        )
        assert sum(d.allowed for d in decisions) == 100
        assert sorted(d.usages[0].value for d in decisions if d.allowed) == list(range(1, 101))
        assert (await backend.usage("p/app", check, now=T0))[0].value == 100

    with_backend(scenario)


def test_no_checks_is_allowed(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        assert await backend.check_and_increment("p/app", []) == Decision(True, [], None)
        await backend.ping()

    with_backend(scenario)


def test_default_now_is_the_current_time(with_backend: Run) -> None:
    async def scenario(backend: CounterBackend) -> None:
        decision = await backend.check_and_increment("p/app", [LimitCheck("h", "hour", 5, 1)])
        reset = decision.usages[0].reset_seconds
        assert reset is not None and 0 < reset <= 3600

    with_backend(scenario)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (("hits", "fortnight", 1, 1), "unknown period 'fortnight'"),
        (("hits", "day", -1, 1), "must be >= 0"),
        (("hits", "day", 1, -1), "must be >= 0"),
    ],
)
def test_invalid_checks_are_refused_when_built(fields: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LimitCheck(*fields)


def test_create_backend_by_kind() -> None:
    memory = create_backend("memory", "redis://127.0.0.1:6379/0", 0.5, "meshgate")
    assert isinstance(memory, MemoryCounters) and isinstance(memory, CounterBackend)
    redis_counters = create_backend("redis", "redis://127.0.0.1:6379/0", 0.5, "meshgate")
    assert isinstance(redis_counters, RedisCounters) and isinstance(redis_counters, CounterBackend)
    asyncio.run(redis_counters.close())
    with pytest.raises(ValueError, match="unknown counter backend 'etcd'"):
        create_backend("etcd", "", 0.5, "meshgate")


def test_memory_forgets_windows_that_ended() -> None:
    async def scenario() -> None:
        backend = MemoryCounters()
        checks = [LimitCheck("hits", "minute", 9, 1), LimitCheck("hits", "eternity", 9, 1)]
        for minute in range(1000):
            await backend.check_and_increment(f"p/app{minute}", checks, now=T0 + 60 * minute)
        # The current minute, the previous one (still in its grace period) and eternity.
        assert len(backend._buckets) == 3
        eternal = await backend.usage("p/app5", checks, now=T0 + 60 * 1000)
        assert [u.value for u in eternal] == [0, 1]

    asyncio.run(scenario())
