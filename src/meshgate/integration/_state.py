"""State that outlives one exchange: aggregation groups and idempotency keys.

In memory for one process; in Redis so that competing consumers share it and a restart
loses nothing. Items are stored as JSON: a body that is bytes is kept as base64.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Protocol

from meshgate.integration._errors import IntegrationError
from meshgate.integration._message import Message

__all__ = [
    "AggregationRepository",
    "IdempotentRepository",
    "MemoryAggregationRepository",
    "MemoryIdempotentRepository",
    "RedisAggregationRepository",
    "RedisIdempotentRepository",
    "message_from_item",
    "message_to_item",
]


def message_to_item(message: Message) -> dict[str, Any]:
    body = message.body
    if isinstance(body, bytes):
        return {"b64": base64.b64encode(body).decode(), "headers": message.headers}
    return {"body": body, "headers": message.headers}


def message_from_item(item: dict[str, Any]) -> Message:
    body = base64.b64decode(item["b64"]) if "b64" in item else item.get("body")
    return Message(body, dict(item.get("headers") or {}))


class AggregationRepository(Protocol):
    async def add(self, key: str, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Append ``item`` to the group ``key``; the group's items after the append."""
        ...

    async def take(self, key: str) -> list[dict[str, Any]]:
        """Remove the group and return its items; empty when another consumer took it."""
        ...

    async def groups(self) -> dict[str, float]:
        """Every open group with the time (epoch seconds) its last item arrived."""
        ...

    async def close(self) -> None: ...


class IdempotentRepository(Protocol):
    async def add(self, key: str) -> bool:
        """Record ``key``; false when it was already there (a duplicate)."""
        ...

    async def contains(self, key: str) -> bool:
        """Whether ``key`` is recorded (and not expired), without recording it."""
        ...

    async def remove(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemoryAggregationRepository:
    def __init__(self) -> None:
        self._groups: dict[str, list[dict[str, Any]]] = {}
        self._updated: dict[str, float] = {}

    async def add(self, key: str, item: dict[str, Any]) -> list[dict[str, Any]]:
        group = self._groups.setdefault(key, [])
        group.append(item)
        self._updated[key] = time.time()
        return list(group)

    async def take(self, key: str) -> list[dict[str, Any]]:
        self._updated.pop(key, None)
        return self._groups.pop(key, [])

    async def groups(self) -> dict[str, float]:
        return dict(self._updated)

    async def close(self) -> None:
        pass


class MemoryIdempotentRepository:
    """Keys in insertion order, the oldest forgotten past ``max_size``."""

    def __init__(self, max_size: int = 100_000, ttl: float | None = None) -> None:
        self._keys: dict[str, float] = {}
        self.max_size = max_size
        self.ttl = ttl

    async def add(self, key: str) -> bool:
        now = time.monotonic()
        seen = self._keys.get(key)
        if seen is not None and (self.ttl is None or now - seen < self.ttl):
            return False
        self._keys.pop(key, None)
        self._keys[key] = now
        while len(self._keys) > self.max_size:
            del self._keys[next(iter(self._keys))]
        return True

    async def contains(self, key: str) -> bool:
        seen = self._keys.get(key)
        return seen is not None and (self.ttl is None or time.monotonic() - seen < self.ttl)

    async def remove(self, key: str) -> None:
        self._keys.pop(key, None)

    async def close(self) -> None:
        pass


def _redis_client(url: str) -> Any:
    import redis.asyncio as redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)


class RedisAggregationRepository:
    """A list per group and a sorted set of groups by last arrival, under ``prefix``."""

    def __init__(self, url: str, prefix: str) -> None:
        self._client = _redis_client(url)
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}:group:{key}"

    async def add(self, key: str, item: dict[str, Any]) -> list[dict[str, Any]]:
        data = json.dumps(item, separators=(",", ":"))
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(self._key(key), data)
                pipe.zadd(f"{self.prefix}:groups", {key: time.time()})
                pipe.lrange(self._key(key), 0, -1)
                result = await pipe.execute()
        except Exception as exc:
            raise IntegrationError(f"aggregation repository (Redis): {exc}") from exc
        return [json.loads(raw) for raw in result[2]]

    async def take(self, key: str) -> list[dict[str, Any]]:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.lrange(self._key(key), 0, -1)
                pipe.delete(self._key(key))
                pipe.zrem(f"{self.prefix}:groups", key)
                result = await pipe.execute()
        except Exception as exc:
            raise IntegrationError(f"aggregation repository (Redis): {exc}") from exc
        return [json.loads(raw) for raw in result[0]]

    async def groups(self) -> dict[str, float]:
        try:
            pairs = await self._client.zrange(f"{self.prefix}:groups", 0, -1, withscores=True)
        except Exception as exc:
            raise IntegrationError(f"aggregation repository (Redis): {exc}") from exc
        return {
            (key.decode() if isinstance(key, bytes) else key): float(score) for key, score in pairs
        }

    async def close(self) -> None:
        await self._client.aclose()


class RedisIdempotentRepository:
    def __init__(self, url: str, prefix: str, ttl: float | None = None) -> None:
        self._client = _redis_client(url)
        self.prefix = prefix
        self.ttl = ttl

    async def add(self, key: str) -> bool:
        expire = None if self.ttl is None else max(1, int(self.ttl * 1000))
        try:
            created = await self._client.set(f"{self.prefix}:{key}", "1", nx=True, px=expire)
        except Exception as exc:
            raise IntegrationError(f"idempotent repository (Redis): {exc}") from exc
        return bool(created)

    async def contains(self, key: str) -> bool:
        try:
            return bool(await self._client.exists(f"{self.prefix}:{key}"))
        except Exception as exc:
            raise IntegrationError(f"idempotent repository (Redis): {exc}") from exc

    async def remove(self, key: str) -> None:
        try:
            await self._client.delete(f"{self.prefix}:{key}")
        except Exception as exc:
            raise IntegrationError(f"idempotent repository (Redis): {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()
