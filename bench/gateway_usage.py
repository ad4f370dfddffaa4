#!/usr/bin/env python3
"""The gateway's CPU per request with usage reporting on, against off, on both backends.

Builds the example configuration (as ``bench/gateway/handler.py`` does: key auth, two
mapping rules, a plan with two limits raised so nothing is refused, metrics on, access log
off) and runs ``Gateway.handle`` -> ``on_response`` -> ``on_complete`` the way the engine
does, in process: no sockets to clients or upstream. Both variants run in the same process
and alternate, so that they share the machine's state; the best of ``--repeat`` timings is
kept for each.

- memory: process CPU per request; usage on adds the in-process sums (``LocalTally``).
- redis (``--redis URL``): ``--concurrency`` requests at a time on one event loop against a
  real Redis, process CPU (the gateway's side only, Redis's own CPU is not counted); usage
  on adds the usage to each check script and posts each response's count.

    python3 bench/gateway_usage.py [--number N] [--repeat R] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources

import uvloop

from meshgate.config import parse_config
from meshgate.gateway import Gateway
from meshgate.gateway._usage import LocalTally, RedisTally, Tally
from meshgate.limits import CounterBackend, MemoryCounters, RedisCounters
from meshgate.proxy import Exchange, Headers, Request
from meshgate.telemetry.metrics import GatewayMetrics

FIELDS = [(b"host", b"api.example.com"), (b"x-api-key", b"k1")]


def build_gateway(counters: CounterBackend, tally: Tally | None) -> Gateway:
    text = resources.files("meshgate.examples").joinpath("gateway.yaml").read_text()
    text = text.replace(
        "{metric: hits, period: minute, value: 5}",
        "{metric: hits, period: minute, value: 1000000000}",
    )
    text += "access_log: false\n"
    return Gateway(parse_config(text), counters, GatewayMetrics(), tally=tally)


def objects() -> tuple[Exchange, Headers]:
    request = Request(
        "GET",
        b"/echo/hello",
        "/echo/hello",
        "",
        Headers(FIELDS),
        client_ip="127.0.0.1",
        host="api.example.com",
        request_id="req-1",
    )
    start = time.perf_counter()
    return Exchange(request, start=start), Headers([(b"content-type", b"application/json")])


def finish(gateway: Gateway, exchange: Exchange, upstream: Headers) -> None:
    exchange.upstream_start = exchange.start + 0.0001
    exchange.upstream_headers_at = exchange.start + 0.0004
    exchange.status = 200
    gateway.on_response(exchange, 200, upstream)
    exchange.end = exchange.start + 0.0005
    gateway.on_complete(exchange)


def memory_request(gateway: Gateway) -> Callable[[], None]:
    def one() -> None:
        exchange, upstream = objects()
        assert gateway.handle(exchange) is None
        finish(gateway, exchange, upstream)

    return one


def cpu_per_request(run: Callable[[int], None], number: int) -> float:
    started = time.process_time()
    run(number)
    return (time.process_time() - started) / number * 1e6


def bench_memory(number: int, repeat: int) -> tuple[float, float]:
    off = memory_request(build_gateway(MemoryCounters(), None))
    tally = LocalTally()
    on = memory_request(build_gateway(MemoryCounters(), tally))

    def runner(one: Callable[[], None]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                one()
            tally.swap()  # what the reporter does every interval

        return run

    best_off = best_on = float("inf")
    for _ in range(repeat):
        best_off = min(best_off, cpu_per_request(runner(off), number))
        best_on = min(best_on, cpu_per_request(runner(on), number))
    return best_off, best_on


async def _redis_requests(gateway: Gateway, number: int, concurrency: int) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            exchange, upstream = objects()
            answer = gateway.handle(exchange)
            if isinstance(answer, Awaitable):
                answer = await answer
            assert answer is None, answer
            finish(gateway, exchange, upstream)

    share = number // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))


async def bench_redis(url: str, number: int, repeat: int, concurrency: int) -> tuple[float, float]:
    prefix = f"bench-usage-{uuid.uuid4().hex[:8]}"
    off_counters = RedisCounters(url, key_prefix=prefix)
    on_counters = RedisCounters(url, key_prefix=prefix)
    off = build_gateway(off_counters, None)
    on = build_gateway(on_counters, RedisTally(on_counters))
    await _redis_requests(off, 200, 20)  # connections and scripts set up
    await _redis_requests(on, 200, 20)
    best_off = best_on = float("inf")
    try:
        for _ in range(repeat):
            for gateway, is_on in ((off, False), (on, True)):
                started = time.process_time()
                await _redis_requests(gateway, number, concurrency)
                await asyncio.sleep(0.05)  # the posted replies come back (counted too)
                cpu = (time.process_time() - started) / number * 1e6
                if is_on:
                    best_on = min(best_on, cpu)
                else:
                    best_off = min(best_off, cpu)
    finally:
        keys = [key async for key in on_counters.redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await on_counters.redis.delete(*keys)
        await off_counters.close()
        await on_counters.close()
    return best_off, best_on


def report(backend: str, off: float, on: float) -> None:
    print(
        f"{backend:6}  usage off {off:6.2f} µs/request   usage on {on:6.2f} µs/request   "
        f"on/off {on / off:.3f} ({(on / off - 1) * 100:+.1f} %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="requests per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings; the best is kept")
    parser.add_argument("--redis", help="a Redis URL: measure the Redis backend too")
    parser.add_argument("--concurrency", type=int, default=64, help="requests at a time (redis)")
    args = parser.parse_args()
    report("memory", *bench_memory(args.number, args.repeat))
    if args.redis:
        result = uvloop.run(bench_redis(args.redis, args.number, args.repeat, args.concurrency))
        report("redis", *result)


if __name__ == "__main__":
    main()
