#!/usr/bin/env python3
"""gRPC unary load for the gateway benchmark: N calls kept in flight on one channel.

It first checks the target: ``/bench.Echo/Say`` with the key answers the bytes sent and,
with ``--bad-key``, a wrong key is refused PERMISSION_DENIED (else exit 1, the reason on
stderr). Then a warm-up, then the measured duration: it prints ``measure`` when that
starts and ``done SECONDS`` when it ends (run.py reads the processes' CPU time at these
two lines), and writes one row per call completed in between to the log file, in the
columns of h2load's ``--log-file``: start (µs since the epoch), status (the gRPC code,
0 is OK), µs until the end of the call.

    python3 bench/gateway/grpc_load.py --target 127.0.0.1:PORT --key k1 --calls 50 \\
        --warmup 2 --duration 10 --log-file calls.log
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import TypeAlias

import grpc
from grpc_echo import METHOD

PAYLOAD = b'{"ok":true}'
Say: TypeAlias = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


class Calls:
    """The callers' shared state: whether completions are recorded, whether to stop."""

    def __init__(self) -> None:
        self.recording = False
        self.stopping = False
        self.rows: list[tuple[int, int, int]] = []


async def caller(say: Say, metadata: tuple[tuple[str, str], ...], calls: Calls) -> None:
    while not calls.stopping:
        wall = time.time_ns()
        start = time.perf_counter_ns()
        try:
            await say(PAYLOAD, metadata=metadata, timeout=10)
            code = grpc.StatusCode.OK.value[0]
        except grpc.aio.AioRpcError as error:
            code = error.code().value[0]
        if calls.recording:
            calls.rows.append((wall // 1000, code, (time.perf_counter_ns() - start) // 1000))


async def check(say: Say, key: str, bad_key: str | None) -> None:
    """Refuse to load a target that does not echo, or that lets a wrong key through."""
    try:
        answer = await say(PAYLOAD, metadata=(("x-api-key", key),), timeout=5)
    except grpc.aio.AioRpcError as error:
        raise SystemExit(f"{METHOD} answered {error.code().name}: {error.details()}") from None
    if answer != PAYLOAD:
        raise SystemExit(f"{METHOD} answered {answer[:200]!r}, expected {PAYLOAD!r}")
    if bad_key is None:
        return
    try:
        await say(PAYLOAD, metadata=(("x-api-key", bad_key),), timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise SystemExit(
                f"a bad API key answered {error.code().name}, expected PERMISSION_DENIED"
            ) from None
    else:
        raise SystemExit("a bad API key was let through")


async def load(args: argparse.Namespace) -> None:
    calls = Calls()
    async with grpc.aio.insecure_channel(args.target) as channel:
        say: Say = channel.unary_unary(METHOD)
        await check(say, args.key, args.bad_key)
        metadata = (("x-api-key", args.key),)
        tasks = [asyncio.create_task(caller(say, metadata, calls)) for _ in range(args.calls)]
        await asyncio.sleep(args.warmup)
        print("measure", flush=True)
        calls.recording = True
        started = time.perf_counter()
        await asyncio.sleep(args.duration)
        calls.recording = False
        print(f"done {time.perf_counter() - started:.6f}", flush=True)
        calls.stopping = True
        await asyncio.gather(*tasks)
    args.log_file.write_text("".join(f"{w}\t{c}\t{us}\n" for w, c, us in calls.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port, cleartext HTTP/2")
    parser.add_argument("--key", required=True, help="the x-api-key metadata sent")
    parser.add_argument("--bad-key", help="check that this key is refused PERMISSION_DENIED")
    parser.add_argument("--calls", type=int, default=50, help="calls in flight")
    parser.add_argument("--warmup", type=float, default=2, help="seconds")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds")
    parser.add_argument("--log-file", type=Path, required=True)
    asyncio.run(load(parser.parse_args()))


if __name__ == "__main__":
    main()
