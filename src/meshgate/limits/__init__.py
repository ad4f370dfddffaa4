"""Usage limits: per-application counters by metric and calendar period.

Every limit a request touches is checked and incremented in one atomic step, in process
memory (one gateway process) or in Redis (exact across processes and hosts).
"""

from meshgate.limits._base import (
    BackendUnavailable,
    CounterBackend,
    Decision,
    LimitCheck,
    Metered,
    Usage,
)
from meshgate.limits._memory import MemoryCounters
from meshgate.limits._redis import RedisCounters

__all__ = [
    "BackendUnavailable",
    "CounterBackend",
    "Decision",
    "LimitCheck",
    "MemoryCounters",
    "Metered",
    "RedisCounters",
    "Usage",
    "create_backend",
]

_KINDS = ("memory", "redis")


def create_backend(kind: str, redis_url: str, timeout: float, key_prefix: str) -> CounterBackend:
    """The counter backend named ``kind`` (``memory`` or ``redis``); connects lazily."""
    if kind == "memory":
        return MemoryCounters()
    if kind == "redis":
        return RedisCounters(redis_url, timeout=timeout, key_prefix=key_prefix)
    raise ValueError(f"unknown counter backend {kind!r}; expected one of {', '.join(_KINDS)}")
