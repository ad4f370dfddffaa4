"""Counters in Redis, exact across gateway processes and hosts.

One Lua script checks every limit of a request and increments them only if all fit, so a
decision is atomic and costs one round trip (EVALSHA; the script is reloaded if Redis
answers NOSCRIPT, e.g. after a SCRIPT FLUSH). Decisions, the hot path, are pipelined on a
connection of our own (``_pipeline``); redis-py serves the rest (MGET, PING).

A decision is fenced: the script counts nothing once Redis's clock is past the time by
which its reply could no longer reach us, so a call that failed here by timing out (the
request refused, or let through uncounted) is not counted later by a stalled Redis that
resumes. What stays unknowable without a second round trip: a connection lost after Redis
ran the script but before its reply came (Redis killed or restarted, the network cut).

Usage for the control plane's reports rides in the same script: a request its limits let
through adds its metrics to the hash of its minute (``{prefix}:usage:{minute}``) in the
EVALSHA that counts it, so what is counted against a limit is reported, and a gateway
killed after the decision loses nothing. Other usage updates (requests with no limit to
check, responses, latency) are posted without waiting for their replies (:meth:`post_usage`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from math import inf
from time import time
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
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
    Metered,
    Usage,
    make_usage,
)
from meshgate.limits._pipeline import Address, Pipeline, PipelineError, encode_command
from meshgate.limits.periods import window

# KEYS[i] is the counter of check i; ARGV holds max, increment and TTL (0: none) per check,
# then the Redis time (microseconds) past which nothing may be counted: -1, too late.
# A key listed twice accumulates, so duplicate checks cannot overshoot together.
# With usage, one more key (the minute's usage hash) and, before the deadline, field and
# increment pairs added to it when the request is allowed. #ARGV = 3 * #KEYS + 1 exactly
# when there is none (with it, 3 * (#KEYS - 1) + 2m + 1 can never be).
_CHECK_AND_INCREMENT = """
local n = #KEYS
if #ARGV ~= 3 * n + 1 then n = n - 1 end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[#ARGV]) then
  return {-1, {}}
end
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
if n < #KEYS then
  local usage = KEYS[n + 1]
  for j = 3 * n + 1, #ARGV - 1, 2 do
    redis.call('HINCRBY', usage, ARGV[j], ARGV[j + 1])
  end
end
return {0, values}
"""

_SCRIPT_SHA = hashlib.sha1(_CHECK_AND_INCREMENT.encode()).hexdigest().encode()
_SCRIPT_LOAD = encode_command("SCRIPT", "LOAD", _CHECK_AND_INCREMENT)

_MAX_KEY_PART = 200
_MAX_ENCODED_KEYS = 16384
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


@lru_cache(maxsize=4096)
def _bulk_int(value: int) -> bytes:
    """``value`` as a RESP bulk string."""
    digits = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


@lru_cache(maxsize=256)
def _evalsha_head(checks: int, pairs: int = -1) -> bytes:
    """The start of an EVALSHA of ``checks`` keys, 3 arguments each and the deadline (which
    the pipeline adds), up to the keys; with ``pairs`` >= 0, the usage hash key and that many
    field and increment pairs too."""
    if pairs < 0:
        return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (
            4 + 4 * checks,
            _SCRIPT_SHA,
            _bulk_int(checks),
        )
    return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (
        5 + 4 * checks + 2 * pairs,
        _SCRIPT_SHA,
        _bulk_int(checks + 1),
    )


@lru_cache(maxsize=8192)
def _bulk(text: str) -> bytes:
    """``text`` as a RESP bulk string."""
    data = text.encode("utf-8", "surrogatepass")
    return b"$%d\r\n%b\r\n" % (len(data), data)


@lru_cache(maxsize=8192)
def _hincrby(key: str, field: str, increment: int) -> bytes:
    """``HINCRBY key field increment``, encoded."""
    return b"*4\r\n$7\r\nHINCRBY\r\n%b%b%b" % (_bulk(key), _bulk(field), _bulk_int(increment))


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _connection_setup(url: str) -> tuple[Address, list[bytes]]:
    """Where to connect for ``url`` and the commands that set a connection up, as redis-py
    reads the URL: TLS for ``rediss://``, a Unix socket for ``unix://``, AUTH, SELECT."""
    options = parse_url(url)
    kind = options.get("connection_class")
    tls = None
    if kind is not None and issubclass(kind, SSLConnection):
        settings: dict[str, Any] = {
            name: value for name, value in options.items() if name.startswith("ssl_")
        }
        tls = SSLConnection(**settings).ssl_context.get
    if kind is not None and issubclass(kind, UnixDomainSocketConnection):
        address = Address(path=options["path"])
    else:
        address = Address(options.get("host", "localhost"), options.get("port", 6379), tls=tls)
    setup = []
    password = options.get("password")
    if password is not None:
        username = options.get("username")
        auth = ("AUTH", password) if username is None else ("AUTH", username, password)
        setup.append(encode_command(*auth))
    if options.get("db", 0):
        setup.append(encode_command("SELECT", options["db"]))
    setup.append(_SCRIPT_LOAD)
    return address, setup


def _redacted(url: str) -> str:
    """``url`` without its password or query, fit for an error message."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:***@{host}" if parts.password is not None else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisCounters:
    """Exact counters shared by every gateway process pointed at the same Redis.

    Decisions are pipelined on one connection per process (see ``_pipeline``): concurrent
    requests share its writes and reads, one EVALSHA each. Every call is bounded by
    ``timeout`` seconds (connecting included) and raises :class:`BackendUnavailable` past it
    (a call that timed out counts nothing, even if Redis runs it later: see the module's
    note) or on any connection error, failing with it the calls that were waiting on the
    same connection; the next call opens a new one, so calls work again once Redis is back.
    After a failed connect, calls wait for the next attempt, at most one per 0.1 s.
    ``max_connections`` bounds the connections of :meth:`usage` and :meth:`ping` only
    (redis-py's pool); more calls at once wait for one.

    Usage for reports is kept here (``keeps_usage``): see the module's note.
    """

    keeps_usage = True

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
            retry=Retry(NoBackoff(), 0),
            # redis-py 8.x skips the pool's stale-connection check under RESP3 (its default),
            # so pooled connections stay dead after a Redis restart (redis/redis-py#4128,
            # fixed by #4260). RESP2 replies are the same for MGET.
            protocol=2,
        )
        self._client = Redis.from_pool(pool)
        self._pipeline = Pipeline(*_connection_setup(url), timeout)
        self._script_load: asyncio.Future[Any] | None = None
        self._windows: dict[str, tuple[int, int | None, float]] = {}
        self._encoded_keys: dict[tuple[str, str, str, int], bytes] = {}
        self._usage_keys: dict[int, str] = {}

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def redis(self) -> Redis:
        """The redis-py client of the calls off the hot path (usage collection)."""
        return self._client

    def usage_key(self, minute: int) -> str:
        """The hash that sums the usage of ``minute`` (epoch seconds, a multiple of 60)."""
        key = self._usage_keys.get(minute)
        if key is None:
            if len(self._usage_keys) > 64:
                self._usage_keys.clear()
            key = self._usage_keys[minute] = f"{self._prefix}:usage:{minute}"
        return key

    def usage_command(self, minute: int, field: str, increment: int) -> bytes:
        """The command that adds ``increment`` to ``field`` of ``minute``'s usage hash, for
        :meth:`post` (callers keep the ones they send often)."""
        return _hincrby(self.usage_key(minute), field, increment)

    def post(self, command: bytes, now: bool = False) -> None:
        """Send ``command`` without waiting for its reply (see ``Pipeline.post``)."""
        self._pipeline.post(command, now)

    def post_usage(self, metered: Metered, now: bool = False) -> None:
        """Add ``metered`` to its minute's usage hash without waiting for Redis; ``now``: on its
        way before anything this callback writes afterwards (see ``Pipeline.post``)."""
        key = self.usage_key(metered[0])
        pairs = metered[1]
        last = len(pairs) - 1
        for index, (field, increment) in enumerate(pairs):
            self._pipeline.post(_hincrby(key, field, increment), now and index == last)

    async def check_and_increment(
        self,
        scope: str,
        checks: Sequence[LimitCheck],
        now: float | None = None,
        usage: Metered | None = None,
    ) -> Decision:
        """Refuse if any check does not fit, else add every increment (and ``usage``, in the
        same script); see CounterBackend."""
        if not checks:
            if usage is not None:
                self.post_usage(usage)
            return Decision(True, [], None)
        if now is None:
            now = time()
        evalsha, ends = self._evalsha(scope, checks, now, usage)
        try:
            reply = await self._pipeline.send(evalsha, fenced=True)
            if type(reply) is not list:
                reply = await self._retry(reply, evalsha)
            rejected, values = reply
            if rejected < 0:
                raise PipelineError("Redis ran the check too late to answer in time: not counted")
        except PipelineError as error:
            raise self._unavailable("check_and_increment", error) from error
        usages = [
            make_usage(check, value, end, now)
            for check, value, end in zip(checks, values, ends, strict=True)
        ]
        if rejected:
            return Decision(False, usages, usages[rejected - 1])
        return Decision(True, usages, None)

    async def _retry(self, reply: object, evalsha: bytes) -> list[Any]:
        """Run ``evalsha`` once more if Redis lost the script (NOSCRIPT: it did not run)."""
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            loading = self._script_load
            # Commands run in order: one SCRIPT LOAD ahead of every retry is enough.
            if loading is None or loading.done():
                loading = self._pipeline.send(_SCRIPT_LOAD)
                # Its failure is the retry's too; nobody awaits it.
                loading.add_done_callback(_ignore)
                self._script_load = loading
            reply = await self._pipeline.send(evalsha, fenced=True)
        if type(reply) is not list:
            raise PipelineError(f"Redis answered: {reply}")
        return reply

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
        """Close every connection, failing the calls still waiting on one."""
        self._pipeline.close()
        await self._client.aclose()

    def _keys(
        self, scope: str, checks: Sequence[LimitCheck], now: float
    ) -> tuple[list[str], list[int | None]]:
        """The Redis key and window end of each check."""
        keys = []
        ends = []
        for check in checks:
            start, end = self._window(check.period, now)
            keys.append(self._key(scope, check.metric, check.period, start))
            ends.append(end)
        return keys, ends

    def _evalsha(
        self, scope: str, checks: Sequence[LimitCheck], now: float, usage: Metered | None = None
    ) -> tuple[bytes, list[int | None]]:
        """The EVALSHA command of a decision, and the window end of each check."""
        encoded_keys = self._encoded_keys
        parts = [_evalsha_head(len(checks), -1 if usage is None else len(usage[1]))]
        args: list[bytes] = []
        ends = []
        for check in checks:
            period = check.period
            start, end = self._window(period, now)
            # Building and encoding keys is most of the client's work per call: keep them.
            ident = (scope, check.metric, period, start)
            key = encoded_keys.get(ident)
            if key is None:
                if len(encoded_keys) >= _MAX_ENCODED_KEYS:
                    encoded_keys.clear()  # mostly windows that ended
                name = self._key(scope, check.metric, period, start).encode()
                key = encoded_keys[ident] = b"$%d\r\n%b\r\n" % (len(name), name)
            parts.append(key)
            ttl = 0 if end is None else int(end - now) + 1 + WINDOW_GRACE
            args += (_bulk_int(check.max), _bulk_int(check.increment), _bulk_int(ttl))
            ends.append(end)
        if usage is not None:
            parts.append(_bulk(self.usage_key(usage[0])))
            for field, increment in usage[1]:
                args += (_bulk(field), _bulk_int(increment))
        parts += args
        return b"".join(parts), ends

    def _window(self, period: str, now: float) -> tuple[int, int | None]:
        """Start and end (``None``: never) of the window of ``period`` at ``now``."""
        cached = self._windows.get(period)
        if cached is None or not cached[0] <= now < cached[2]:
            start, end = window(period, now)
            cached = self._windows[period] = (start, end, inf if end is None else end)
        return cached[0], cached[1]

    def _key(self, scope: str, metric: str, period: str, start: int) -> str:
        """The counter of ``metric`` in the window of ``period`` from ``start``.

        The scope is the hash tag, so one request's keys share a Redis Cluster slot.
        """
        return f"{self._prefix}:{{{_key_part(scope)}}}:{_key_part(metric)}:{period}:{start}"

    def _unavailable(self, operation: str, error: BaseException) -> BackendUnavailable:
        if isinstance(error, PipelineError):
            reason = str(error)
        elif isinstance(error, TimeoutError | RedisTimeoutError):
            reason = f"no answer within {self._timeout}s"
        else:
            reason = f"{type(error).__name__}: {error}"
        return BackendUnavailable(f"Redis at {self._where} failed {operation}: {reason}")
