"""RedisCounters against real servers: exactness across processes, outages, recovery, keys."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
import redis

from meshgate.limits import BackendUnavailable, LimitCheck, RedisCounters

HITS = [LimitCheck("hits", "minute", 100, 1)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test alone, which it may kill and start again."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture
def private_redis(redis_server_binary: str, tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(redis_server_binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def expect_unavailable(counters: RedisCounters, limit: float) -> str:
    """Call check_and_increment, which must raise BackendUnavailable within ``limit`` s."""
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await counters.check_and_increment("p/app", HITS)
    assert time.monotonic() - started < limit
    return str(raised.value)


def test_closed_port_fails_fast() -> None:
    async def scenario() -> None:
        counters = RedisCounters("redis://127.0.0.1:1/0", timeout=0.5)
        try:
            message = await expect_unavailable(counters, 1.0)
            assert "redis://127.0.0.1:1/0" in message and "check_and_increment" in message
            with pytest.raises(BackendUnavailable, match="failed usage"):
                await counters.usage("p/app", HITS)
            with pytest.raises(BackendUnavailable, match="failed ping"):
                await counters.ping()
        finally:
            await counters.close()

    asyncio.run(scenario())


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog, nothing is ever read
        port = silent.getsockname()[1]

        async def scenario() -> None:
            counters = RedisCounters(f"redis://127.0.0.1:{port}/0", timeout=0.3)
            try:
                for _ in range(2):
                    started = time.monotonic()
                    message = await expect_unavailable(counters, 1.0)
                    assert time.monotonic() - started >= 0.25
                    assert "no answer within 0.3s" in message
            finally:
                await counters.close()

        asyncio.run(scenario())


def test_password_stays_out_of_the_message() -> None:
    async def scenario() -> None:
        counters = RedisCounters("redis://meshgate:s3cret@127.0.0.1:1/0", timeout=0.5)
        try:
            message = await expect_unavailable(counters, 1.0)
            assert "s3cret" not in message and "meshgate:***@127.0.0.1:1" in message
        finally:
            await counters.close()

    asyncio.run(scenario())


def test_recovers_when_redis_comes_back(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        counters = RedisCounters(private_redis.url, timeout=0.5, max_connections=8)
        try:
            # Several pooled connections, all of which go stale with the server.
            decisions = await asyncio.gather(
                *(counters.check_and_increment("p/app", HITS) for _ in range(20))
            )
            assert all(d.allowed for d in decisions)

            private_redis.kill()
            for _ in range(3):
                await expect_unavailable(counters, 1.5)

            private_redis.start()  # same port, empty and without the script
            first = await counters.check_and_increment("p/app", HITS)
            assert first.allowed and first.usages[0].value == 1
            decisions = await asyncio.gather(
                *(counters.check_and_increment("p/app", HITS) for _ in range(20))
            )
            assert sorted(d.usages[0].value for d in decisions) == list(range(2, 22))
            await counters.ping()
        finally:
            await counters.close()

    asyncio.run(scenario())


def test_one_round_trip_per_request(private_redis: PrivateRedis) -> None:
    async def scenario() -> None:
        counters = RedisCounters(private_redis.url)
        checks = [LimitCheck("hits", "minute", 100, 1), LimitCheck("search", "day", 50, 1)]
        try:
            await counters.check_and_increment("p/app", checks)  # connects, loads the script
            admin = private_redis.client()
            admin.config_resetstat()
            for _ in range(10):
                await counters.check_and_increment("p/app", checks)
            stats = admin.info("commandstats")
            admin.close()
        finally:
            await counters.close()
        counted = {
            name: row["calls"]
            for name, row in stats.items()
            if not name.startswith(("cmdstat_info", "cmdstat_config"))
        }
        # One EVALSHA a request; TIME, GET, INCRBY and EXPIRE run inside it, in Redis.
        assert counted == {"cmdstat_evalsha": 10, "cmdstat_time": 10, "cmdstat_get": 20,
                           "cmdstat_incrby": 20, "cmdstat_expire": 20}  # fmt: skip

    asyncio.run(scenario())


def test_keys_expire_after_their_window(redis_url: str, key_prefix: str) -> None:
    checks = [
        LimitCheck("hits", "minute", 10, 1),
        LimitCheck("hits", "month", 10, 1),
        LimitCheck("hits", "eternity", 10, 1),
        LimitCheck("peek", "minute", 10, 0),
    ]

    async def scenario() -> list[int | None]:
        counters = RedisCounters(redis_url, key_prefix=key_prefix)
        try:
            decision = await counters.check_and_increment("p/app", checks)
            return [usage.reset_seconds for usage in decision.usages]
        finally:
            await counters.close()

    resets = asyncio.run(scenario())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted(client.scan_iter(match=f"{key_prefix}:*"))
        ttls = {key.rsplit(":", 2)[1]: client.ttl(key) for key in keys}
    finally:
        client.close()
    assert len(keys) == 3  # an increment of 0 creates nothing
    assert all(key.startswith(f"{key_prefix}:{{p%2Fapp}}:hits:") for key in keys)
    minute, month = resets[0], resets[1]
    assert minute is not None and month is not None
    assert minute < ttls["minute"] <= minute + 61
    assert month < ttls["month"] <= month + 61
    assert ttls["eternity"] == -1


def _hammer(
    url: str,
    prefix: str,
    now: float,
    calls: int,
    start: Barrier,
    results: Queue[int],
) -> None:
    """One gateway process: ``calls`` concurrent requests once every process is ready."""

    async def fire() -> int:
        counters = RedisCounters(url, timeout=10.0, key_prefix=prefix)
        try:
            await counters.ping()
            start.wait()
            decisions = await asyncio.gather(
                *(counters.check_and_increment("p/app", HITS, now=now) for _ in range(calls))
            )
            return sum(d.allowed for d in decisions)
        finally:
            await counters.close()

    results.put(asyncio.run(fire()))


def test_processes_sharing_redis_allow_exactly_the_limit(redis_url: str, key_prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    results: Queue[int] = context.Queue()
    now = time.time()
    workers = [
        context.Process(target=_hammer, args=(redis_url, key_prefix, now, 125, start, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        allowed = [results.get(timeout=60) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    assert sum(allowed) == 100

    async def stored() -> int:
        counters = RedisCounters(redis_url, key_prefix=key_prefix)
        try:
            return (await counters.usage("p/app", HITS, now=now))[0].value
        finally:
            await counters.close()

    assert asyncio.run(stored()) == 100
