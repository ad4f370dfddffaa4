"""Counters in Redis, exact across gateway processes and hosts.

One Lua script checks every limit of a request and increments them only if all fit, so a
decision is atomic and costs one round trip (EVALSHA; the script is reloaded if Redis
answers NOSCRIPT, e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from math import inf
from time import time
from urllib.parse import quote, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meshgate.limits._base import (
    WINDOW_GRACE,
    BackendUnavailable,
    Decision,
    LimitCheck,
    Usage,
    make_usage,
)
from meshgate.limits.periods import window

# KEYS[i] is the counter of check i; ARGV holds max, increment and TTL (0: none) per check.
# A key listed twice accumulates, so duplicate checks cannot overshoot together.
_CHECK_AND_INCREMENT = """
local n = #KEYS
local after = {}
local values = {}
for i = 1, n do
  local key = KEYS[i]
  local value = after[key]
  if value == nil then value = tonumber(redis.call('GET', key) or 0) end
  local increment = tonumber(ARGV[3 * i - 1])
  if increment > 0 and value + increment > tonumber(ARGV[3 * i - 2]) then
    for j = 1, n do values[j] = tonumber(redis.call('GET', KEYS[j]) or 0) end
    return {i, values}
  end
  after[key] = value + increment
end
for i = 1, n do
  local increment = tonumber(ARGV[3 * i - 1])
  if increment > 0 then
    redis.call('INCRBY', KEYS[i], increment)
    local ttl = tonumber(ARGV[3 * i])
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  end
  values[i] = after[KEYS[i]]
end
return {0, values}
"""

_MAX_KEY_PART = 200
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)


@lru_cache(maxsize=8192)
def _key_part(text: str) -> str:
    """Percent-encode ``text`` so that ``:`` and braces cannot merge parts; hash long ones.

    Encoded parts never contain ``#``, so a hashed part cannot equal an encoded one.
    """
    encoded = quote(text, safe="", errors="surrogatepass")
    if len(encoded) <= _MAX_KEY_PART:
        return encoded
    return "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _redacted(url: str) -> str:
    """``url`` without its password or query, fit for an error message."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:***@{host}" if parts.password is not None else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisCounters:
    """Exact counters shared by every gateway process pointed at the same Redis.

    Every call is bounded by ``timeout`` seconds (waiting for a pooled connection
    included) and raises :class:`BackendUnavailable` past it or on any connection error.
    Failed connections are dropped, so calls work again once Redis is back.
    ``max_connections`` bounds concurrent commands per process; more wait for a connection.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        key_prefix: str = "meshgate",
        *,
        max_connections: int = 64,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            # Braces would take the Redis Cluster hash tag away from the scope.
            raise ValueError(f"key_prefix must not contain braces: {key_prefix!r}")
        self._timeout = timeout
        self._prefix = key_prefix
        self._where = _redacted(url)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # A check-and-increment is not idempotent: a retry after a lost reply counts twice.
            retry=Retry(NoBackoff(), 0),
            # redis-py 8.x skips the pool's stale-connection check under RESP3 (its default),
            # so pooled connections stay dead after a Redis restart (redis/redis-py#4128,
            # fixed by #4260). RESP2 replies are the same for this script and MGET.
            protocol=2,
        )
        self._client = Redis.from_pool(pool)
        self._script = self._client.register_script(_CHECK_AND_INCREMENT)
        self._windows: dict[str, tuple[int, int | None, float]] = {}

    async def check_and_increment(
        self, scope: str, checks: Sequence[LimitCheck], now: float | None = None
    ) -> Decision:
        """Refuse if any check does not fit, else add every increment; see CounterBackend."""
        if not checks:
            return Decision(True, [], None)
        if now is None:
            now = time()
        keys, ends = self._keys(scope, checks, now)
        args: list[int] = []
        for check, end in zip(checks, ends, strict=True):
            ttl = 0 if end is None else int(end - now) + 1 + WINDOW_GRACE
            args += (check.max, check.increment, ttl)
        try:
            async with asyncio.timeout(self._timeout):
                rejected, values = await self._script(keys, args)
        except _UNAVAILABLE as error:
            raise self._unavailable("check_and_increment", error) from error
        usages = [
            make_usage(check, value, end, now)
            for check, value, end in zip(checks, values, ends, strict=True)
        ]
        if rejected:
            return Decision(False, usages, usages[rejected - 1])
        return Decision(True, usages, None)

    async def usage(
        self, scope: str, checks: Sequence[LimitCheck], now: float | None = None
    ) -> list[Usage]:
        """Current usage of each check, counting nothing (one MGET)."""
        if not checks:
            return []
        if now is None:
            now = time()
        keys, ends = self._keys(scope, checks, now)
        try:
            async with asyncio.timeout(self._timeout):
                values = await self._client.mget(keys)
        except _UNAVAILABLE as error:
            raise self._unavailable("usage", error) from error
        return [
            make_usage(check, 0 if value is None else int(value), end, now)
            for check, value, end in zip(checks, values, ends, strict=True)
        ]

    async def ping(self) -> None:
        """Raise :class:`BackendUnavailable` unless Redis answers within the timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except _UNAVAILABLE as error:
            raise self._unavailable("ping", error) from error

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._client.aclose()

    def _keys(
        self, scope: str, checks: Sequence[LimitCheck], now: float
    ) -> tuple[list[str], list[int | None]]:
        """The Redis key and window end of each check.

        The scope is the hash tag, so one request's keys share a Redis Cluster slot.
        """
        base = f"{self._prefix}:{{{_key_part(scope)}}}:"
        windows = self._windows
        keys = []
        ends = []
        for check in checks:
            period = check.period
            cached = windows.get(period)
            if cached is None or not cached[0] <= now < cached[2]:
                start, end = window(period, now)
                cached = windows[period] = (start, end, inf if end is None else end)
            keys.append(f"{base}{_key_part(check.metric)}:{period}:{cached[0]}")
            ends.append(cached[1])
        return keys, ends

    def _unavailable(self, operation: str, error: BaseException) -> BackendUnavailable:
        if isinstance(error, TimeoutError | RedisTimeoutError):
            reason = f"no answer within {self._timeout}s"
        else:
            reason = f"{type(error).__name__}: {error}"
        return BackendUnavailable(f"Redis at {self._where} failed {operation}: {reason}")
