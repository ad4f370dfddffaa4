"""Collects the usage every gateway sums in Redis into batches, one gateway at a time.

Gateways add to one hash per minute (``{prefix}:usage:{minute}``, see ``_usage``). The
gateway holding the lock (``{prefix}:usage:lock``, with an expiry, renewed each interval)
moves each closed minute's hash (older than the minute before the current one; every
minute on a graceful stop) to a pending key in one script (RENAME), numbered from a counter
in Redis and listed in an outbox, oldest first. A batch is built from a pending key, its id
the Redis store's origin (a UUID kept in Redis) and the pending key's number, so whoever
builds it builds the same batch; the pending key is deleted only once the control plane
acknowledged it. Pending keys that the lock holder did not build itself (a killed
collector's) are built and sent again, with the same ids: counted once, lost never.

Late writes to a minute already moved (a gateway whose clock lags) make a new hash for it;
the script looks back two hours behind its mark for such hashes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from meshgate.gateway._usage import batch_bodies, rows_from_fields
from meshgate.limits import RedisCounters

__all__ = ["RedisOutbox"]

log = logging.getLogger("meshgate.gateway.usage")

LOOKBACK_MINUTES = 120
# The first collection on a Redis store looks back this far for hashes.
FIRST_LOOKBACK_MINUTES = 7 * 24 * 60

# KEYS: mark, outbox, sequence. ARGV: key prefix, cutoff minute (hashes of earlier minutes
# move), lookback and first lookback (minutes). Returns how many hashes moved.
_MOVE = """
local prefix = ARGV[1]
local cutoff = tonumber(ARGV[2])
local mark = tonumber(redis.call('GET', KEYS[1]) or '-1')
local from
if mark >= 0 then
  from = mark - 60 * tonumber(ARGV[3])
else
  from = cutoff - 60 * tonumber(ARGV[4])
end
local moved = 0
for minute = from, cutoff - 60, 60 do
  local key = prefix .. ':usage:' .. minute
  if redis.call('EXISTS', key) == 1 then
    local seq = redis.call('INCR', KEYS[3])
    local pending = prefix .. ':usage:pending:' .. seq .. ':' .. minute
    redis.call('RENAME', key, pending)
    redis.call('ZADD', KEYS[2], seq, pending)
    moved = moved + 1
  end
end
if cutoff - 60 > mark then redis.call('SET', KEYS[1], cutoff - 60) end
return moved
"""

# KEYS: lock. ARGV: token, milliseconds. Takes the lock, or renews it when ours.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock. ARGV: token. Releases the lock when ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisOutbox:
    """The batches of the usage summed in Redis (see the module's note)."""

    def __init__(
        self, counters: RedisCounters, interval: float, max_pending: int, holder: str
    ) -> None:
        self.counters = counters
        prefix = counters.key_prefix
        self.prefix = prefix
        self.lock_key = f"{prefix}:usage:lock"
        self.mark_key = f"{prefix}:usage:mark"
        self.outbox_key = f"{prefix}:usage:outbox"
        self.sequence_key = f"{prefix}:usage:seq"
        self.origin_key = f"{prefix}:usage:origin"
        self.token = f"{holder}:{uuid.uuid4().hex}"
        self.lock_ms = int(max(3 * interval, 1.0) * 1000)
        self.max_pending = max_pending
        self.origin: str | None = None
        # Pending keys this process spooled and that await their acknowledgement.
        self.inflight: set[str] = set()
        self.failing = False
        self.on_drop: Callable[[int], None] = lambda count: None

    async def collect(self, final: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
        try:
            return await self._collect(final)
        except RedisError as exc:
            if not self.failing:
                log.warning("usage not collected from Redis, tried again later: %s", exc)
            self.failing = True
            return []

    async def _collect(self, final: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
        redis = self.counters.redis
        if not await redis.eval(_LOCK, 1, self.lock_key, self.token, self.lock_ms):
            return []
        self.failing = False
        if self.origin is None:
            await redis.set(self.origin_key, uuid.uuid4().hex, nx=True)
            origin = await redis.get(self.origin_key)
            self.origin = origin.decode() if isinstance(origin, bytes) else str(origin)
        now = int(time.time()) // 60 * 60
        # Closed: older than the minute before this one. Stopping: every minute, a little of
        # the future too (a clock ahead of ours).
        cutoff = now + 180 if final else now - 60
        await redis.eval(
            _MOVE,
            3,
            self.mark_key,
            self.outbox_key,
            self.sequence_key,
            self.prefix,
            cutoff,
            LOOKBACK_MINUTES,
            FIRST_LOOKBACK_MINUTES,
        )
        await self._bound()
        out: list[tuple[str, bytes, dict[str, Any]]] = []
        for raw in await redis.zrange(self.outbox_key, 0, -1):
            pending = raw.decode() if isinstance(raw, bytes) else str(raw)
            if pending in self.inflight:
                continue
            out += await self._build(pending)
        if final:
            await redis.eval(_UNLOCK, 1, self.lock_key, self.token)
        return out

    async def _build(self, pending: str) -> list[tuple[str, bytes, dict[str, Any]]]:
        """The batches of one pending key: the same for whoever builds them."""
        _, _, numbers = pending.rpartition(":usage:pending:")
        sequence, _, minute = numbers.partition(":")
        fields = await self.counters.redis.hgetall(pending)
        rows = rows_from_fields(int(minute), fields.items())
        if not len(rows):
            await self._forget(pending)
            return []
        bodies = batch_bodies(rows, lambda i: f"{self.origin}:{sequence}:{i}")
        self.inflight.add(pending)
        last = len(bodies) - 1
        return [
            (ident, body, {"redis_pending": pending} if index == last else {})
            for index, (ident, body) in enumerate(bodies)
        ]

    async def acknowledged(self, after: dict[str, Any]) -> None:
        """The last batch of a pending key was acknowledged: the key goes."""
        pending = after.get("redis_pending")
        if isinstance(pending, str) and pending.startswith(f"{self.prefix}:usage:pending:"):
            await self._forget(pending)

    async def _forget(self, pending: str) -> None:
        redis = self.counters.redis
        await redis.delete(pending)
        await redis.zrem(self.outbox_key, pending)
        self.inflight.discard(pending)

    async def _bound(self) -> None:
        """Past ``max_pending`` pending keys (the control plane away for long), the oldest go."""
        redis = self.counters.redis
        excess = await redis.zcard(self.outbox_key) - self.max_pending
        if excess <= 0:
            return
        oldest = await redis.zrange(self.outbox_key, 0, excess - 1)
        for raw in oldest:
            await self._forget(raw.decode() if isinstance(raw, bytes) else str(raw))
        self.on_drop(len(oldest))
        log.warning(
            "usage outbox in Redis full (%d batches at most): dropped the %d oldest unsent; "
            "their usage is lost",
            self.max_pending,
            len(oldest),
        )
