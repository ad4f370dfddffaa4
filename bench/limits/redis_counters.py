#!/usr/bin/env python3
"""Client CPU per ``RedisCounters.check_and_increment`` call under concurrency.

Not a test: ``python3 bench/limits/redis_counters.py`` runs ``--in-flight`` callers
on uvloop (the gateway's loop) until ``--calls`` decisions are made, against the Redis at
``--url``, and prints this process's CPU (user + system) per call next to redis-server's
own. ``--module FILE`` loads ``RedisCounters`` from another file, e.g. an older version,
to compare both in one run. Keys go under a unique prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import time
import uuid
from typing import Any

import redis
import uvloop

from meshgate.limits import LimitCheck

CHECKS = {
    1: [LimitCheck("hits", "minute", 1_000_000_000, 1)],
    2: [LimitCheck("hits", "minute", 1_000_000_000, 1), LimitCheck("search", "day", 10**9, 1)],
}


def load_counters(module: str | None) -> Any:
    if module is None:
        from meshgate.limits import RedisCounters

        return RedisCounters
    spec = importlib.util.spec_from_file_location("bench_counters", module)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.RedisCounters


def server_cpu(client: redis.Redis) -> float:
    """redis-server's user + system CPU seconds, when it runs on this host."""
    pid = client.info("server")["process_id"]
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(counters_class: Any, url: str, in_flight: int, calls: int, checks: int) -> None:
    prefix = f"meshgate-bench-{uuid.uuid4().hex}"
    counters = counters_class(url, timeout=5.0, key_prefix=prefix)
    admin = redis.Redis.from_url(url)
    todo = calls
    limit_checks = CHECKS[checks]

    async def caller() -> None:
        nonlocal todo
        while todo > 0:
            todo -= 1
            await counters.check_and_increment("p/app1", limit_checks)

    try:
        await asyncio.gather(*(caller() for _ in range(in_flight)))  # warm-up, connections
        todo = calls
        server_before = server_cpu(admin)
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        server = server_cpu(admin) - server_before
        print(
            f"{in_flight:4d} in flight, {checks} check(s): client {cpu / calls * 1e6:6.1f} µs/call"
            f"  redis-server {server / calls * 1e6:5.1f} µs/call  {calls / wall:8.0f} calls/s"
        )
    finally:
        await counters.close()
        keys = list(admin.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            admin.delete(*keys)
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--in-flight", default="1,8,64,256")
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--checks", type=int, choices=sorted(CHECKS), default=1)
    parser.add_argument("--module", help="a file to load RedisCounters from instead")
    args = parser.parse_args()
    counters_class = load_counters(args.module)
    print(f"{counters_class.__module__}, Python {sys.version.split()[0]}")
    for in_flight in map(int, args.in_flight.split(",")):
        uvloop.run(run(counters_class, args.url, in_flight, args.calls, args.checks))


if __name__ == "__main__":
    main()
