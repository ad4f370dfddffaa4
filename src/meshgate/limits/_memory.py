"""Counters in a dict, for a gateway that runs as one process."""

from __future__ import annotations

from collections.abc import Sequence
from math import ceil, inf
from time import time

from meshgate.limits._base import WINDOW_GRACE, Decision, LimitCheck, Metered, Usage, make_usage
from meshgate.limits.periods import window


class _Bucket:
    """The counts of one period window, dropped as a whole once the window has ended."""

    __slots__ = ("start", "end", "stop", "counts")

    def __init__(self, start: int, end: int | None) -> None:
        self.start = start
        self.end = end
        self.stop: float = inf if end is None else end
        self.counts: dict[tuple[str, str], int] = {}


class MemoryCounters:
    """Exact counters for one process; not shared between workers or hosts.

    The check and the increments run without an ``await`` in between, so concurrent
    tasks on one event loop cannot interleave inside a decision. Usage for reports is the
    caller's to keep (``keeps_usage`` is false): it lives in the same process either way.
    """

    __slots__ = ("_buckets", "_current")

    keeps_usage = False

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, int], _Bucket] = {}
        # The window each period was last used in: one comparison instead of a calendar
        # computation on almost every call.
        self._current: dict[str, _Bucket] = {}

    async def check_and_increment(
        self,
        scope: str,
        checks: Sequence[LimitCheck],
        now: float | None = None,
        usage: Metered | None = None,
    ) -> Decision:
        """Refuse if any check does not fit, else add every increment; see CounterBackend."""
        return self.check_and_increment_nowait(scope, checks, now)

    def check_and_increment_nowait(
        self, scope: str, checks: Sequence[LimitCheck], now: float | None = None
    ) -> Decision:
        """The same decision without a coroutine: nothing here ever waits."""
        if now is None:
            now = time()
        current = self._current
        buckets: list[_Bucket] = []
        for check in checks:
            bucket = current.get(check.period)
            if bucket is None or not bucket.start <= now < bucket.stop:
                bucket = self._enter(check.period, now)
            buckets.append(bucket)
            increment = check.increment
            if increment:
                counts = bucket.counts
                key = (scope, check.metric)
                value = counts.get(key, 0) + increment
                if value > check.max:
                    return self._refuse(scope, checks, buckets, now)
                counts[key] = value
        usages = []
        # Indexing, not zip(strict=True): the lists are equal here and zip costs more.
        for index, check in enumerate(checks):
            bucket = buckets[index]
            value = bucket.counts.get((scope, check.metric), 0)
            limit = check.max
            end = bucket.end
            usages.append(
                Usage(
                    check.metric,
                    check.period,
                    limit,
                    value,
                    limit - value if value < limit else 0,
                    None if end is None else ceil(end - now),
                )
            )
        return Decision(True, usages, None)

    async def usage(
        self, scope: str, checks: Sequence[LimitCheck], now: float | None = None
    ) -> list[Usage]:
        """Current usage of each check, counting nothing."""
        return self._read(scope, checks, time() if now is None else now)

    async def ping(self) -> None:
        """Always reachable: the counters live in this process."""

    async def close(self) -> None:
        """Forget every counter."""
        self._buckets.clear()
        self._current.clear()

    def _enter(self, period: str, now: float) -> _Bucket:
        """Make the window of ``period`` holding ``now`` current; drop windows long ended."""
        start, end = window(period, now)
        bucket = self._buckets.get((period, start))
        if bucket is None:
            bucket = self._buckets[(period, start)] = _Bucket(start, end)
        self._current[period] = bucket
        # Runs only when a period changes window, over a handful of live windows.
        expired = now - WINDOW_GRACE
        ended = [key for key, old in self._buckets.items() if old.stop <= expired]
        if ended:
            for key in ended:
                del self._buckets[key]
            for stale in [p for p, old in self._current.items() if old.stop <= expired]:
                del self._current[stale]
        return bucket

    def _refuse(
        self, scope: str, checks: Sequence[LimitCheck], buckets: list[_Bucket], now: float
    ) -> Decision:
        """Undo what this request already added (its last check refused) and report usage."""
        refused = len(buckets) - 1
        for index in range(refused):
            check = checks[index]
            if check.increment:
                counts = buckets[index].counts
                key = (scope, check.metric)
                value = counts[key] - check.increment
                if value:
                    counts[key] = value
                else:
                    del counts[key]
        usages = self._read(scope, checks, now)
        return Decision(False, usages, usages[refused])

    def _read(self, scope: str, checks: Sequence[LimitCheck], now: float) -> list[Usage]:
        """Usage of each check without creating windows or keys."""
        usages = []
        for check in checks:
            bucket = self._current.get(check.period)
            if bucket is not None and bucket.start <= now < bucket.stop:
                end = bucket.end
            else:
                start, end = window(check.period, now)
                bucket = self._buckets.get((check.period, start))
            value = 0 if bucket is None else bucket.counts.get((scope, check.metric), 0)
            usages.append(make_usage(check, value, end, now))
        return usages
