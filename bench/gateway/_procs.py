"""What the gateway CPU benchmarks share: free ports, waiting for an answer, a process's CPU
time, and meshgate processes pinned to a core."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["TICKS", "cpu_per_request", "cpu_ticks", "free_port", "spawn", "wait_ok"]

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ok(url: str, seconds: float = 30, headers: dict[str, str] | None = None) -> httpx.Response:
    """The first 200 ``url`` answers within ``seconds``; exits the benchmark otherwise."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            r = httpx.get(url, headers=headers, timeout=1)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer 200 within {seconds}s")
        time.sleep(0.1)


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` so far, in clock ticks (TICKS a second)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def spawn(args: list[str], core: str, workdir: Path, name: str) -> subprocess.Popen[bytes]:
    """``python -m meshgate ARGS`` on ``core`` (taskset), its output in ``workdir/NAME.log``."""
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(
        ["taskset", "-c", core, sys.executable, "-m", "meshgate", *args],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def cpu_per_request(pid: int, url: str, seconds: int) -> dict[str, float | int]:
    """wrk (-c50, core 0, key k1) against ``url`` for 2 s of warm-up, then ``seconds``
    measured: requests/s, ``pid``'s CPU µs per request, non-2xx answers."""
    wrk = ["taskset", "-c", "0", "wrk", "-t1", "-c50", "-H", "X-API-Key: k1"]
    subprocess.run([*wrk, "-d2s", url], capture_output=True, check=True)
    before = cpu_ticks(pid)
    out = subprocess.run(
        [*wrk, f"-d{seconds}s", url], capture_output=True, text=True, check=True
    ).stdout
    ticks = cpu_ticks(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": round(requests / seconds),
        "cpu_us_per_request": round(ticks / TICKS / requests * 1e6, 2),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }
