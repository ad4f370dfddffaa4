"""What a counter backend takes, answers and promises, independent of where counts live."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from meshgate.limits.periods import PERIODS

_KNOWN_PERIODS = frozenset(PERIODS)

# Seconds a window's counts outlive its end, so that a request stamped a little earlier, or
# counted by a host whose clock lags, still lands in the window it belongs to.
WINDOW_GRACE = 60


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit a request touches: at most ``max`` of ``metric`` per ``period``, adding
    ``increment`` (0 only reads the current value)."""

    metric: str
    period: str
    max: int
    increment: int

    def __post_init__(self) -> None:
        if self.period not in _KNOWN_PERIODS:
            raise ValueError(
                f"unknown period {self.period!r} for metric {self.metric!r}; "
                f"expected one of {', '.join(PERIODS)}"
            )
        if self.max < 0 or self.increment < 0:
            raise ValueError(
                f"limit {self.metric!r}/{self.period}: max and increment must be >= 0, "
                f"got max={self.max} increment={self.increment}"
            )


@dataclass(slots=True)
class Usage:
    """A counter as the request left it: what the RateLimit response headers report."""

    metric: str
    period: str
    limit: int
    value: int
    remaining: int
    reset_seconds: int | None


@dataclass(slots=True)
class Decision:
    """Whether the request fits every limit; ``usages`` follow the order of the checks."""

    allowed: bool
    usages: list[Usage]
    rejected: Usage | None


# What a request its limits let through adds to the usage reported to the control plane:
# its minute (epoch seconds, a multiple of 60) and (field, increment) pairs, each field one
# product, application and metric (encoded by the gateway). A backend that ``keeps_usage``
# adds them in the same step as the limits; the others leave usage to the caller.
Metered = tuple[int, Sequence[tuple[str, int]]]


class BackendUnavailable(Exception):
    """The counter store could not be reached or did not answer in time.

    The caller decides whether to fail open or closed; nothing was counted.
    """


@runtime_checkable
class CounterBackend(Protocol):
    """Counts usage per scope (e.g. ``"product/app1"``), metric and period window.

    ``check_and_increment`` is one atomic step over all ``checks``: a request refused by
    any limit with ``increment > 0`` (``value + increment > max``) increments none.
    ``now`` (epoch seconds) defaults to the current time. ``usage`` (see :data:`Metered`) is
    added with the increments by a backend whose ``keeps_usage`` is true, else ignored.
    """

    keeps_usage: bool

    async def check_and_increment(
        self,
        scope: str,
        checks: Sequence[LimitCheck],
        now: float | None = None,
        usage: Metered | None = None,
    ) -> Decision: ...

    async def usage(
        self, scope: str, checks: Sequence[LimitCheck], now: float | None = None
    ) -> list[Usage]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def make_usage(check: LimitCheck, value: int, end: int | None, now: float) -> Usage:
    """Usage of ``check`` at ``value``; the reset rounds up so a client never retries early."""
    limit = check.max
    return Usage(
        check.metric,
        check.period,
        limit,
        value,
        limit - value if value < limit else 0,
        None if end is None else math.ceil(end - now),
    )
