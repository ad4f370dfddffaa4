"""Helpers for the gateway end-to-end tests: polling, /usage and /metrics readers, an
independent UTC calendar, the shared Redis and private Redis servers.

Not a test module (no ``test_`` prefix); the e2e test files import it by name.
"""

from __future__ import annotations

import calendar
import math
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
from harness import Gateway, free_port, unavailable
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")

# Generous: the machine is shared and small; polling returns as soon as the condition holds.
TIMEOUT = 20.0


# The example's plan over eternity: counts that no window boundary can reset mid-test.
ETERNAL_PLANS = [
    {
        "name": "basic",
        "limits": [
            {"metric": "hits", "period": "eternity", "value": 5},
            {"metric": "search", "period": "eternity", "value": 1000},
        ],
    }
]


def wait_for(check: Callable[[], T], timeout: float = TIMEOUT, what: str = "condition") -> T:
    """Poll ``check`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(0.05)
        last = check()
    return last


def usage(gw: Gateway, app: str, product: str | None = None) -> dict[tuple[str, str], Any]:
    """``/usage/{app}`` as ``{(metric, period): {value, limit, remaining, reset_seconds}}``."""
    response = httpx.get(f"{gw.admin_url}/usage/{app}", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["application"] == app
    products = [p for p in doc["products"] if product is None or p["product"] == product]
    assert len(products) == 1, doc
    return {(u["metric"], u["period"]): u for u in products[0]["limits"]}


def values(gw: Gateway, app: str, product: str | None = None) -> dict[tuple[str, str], int]:
    """Just the counted values of ``/usage/{app}``."""
    return {key: u["value"] for key, u in usage(gw, app, product).items()}


def access_log(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The gateway's access log once it holds at least ``count`` lines (it is flushed often)."""
    wait_for(lambda: len(gw.access_log()) >= count, what=f"{count} access log lines")
    return gw.access_log()


def scrape(gw: Gateway) -> str:
    response = httpx.get(f"{gw.admin_url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    return response.text


def sample_sum(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples named ``sample_name`` whose labels include ``labels``; 0 if none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def has_sample(text: str, sample_name: str, **labels: str) -> bool:
    return any(
        sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def window_end(period: str, now: datetime) -> datetime | None:
    """End of the UTC calendar window of ``period`` holding ``now``, by datetime arithmetic
    (deliberately not meshgate.limits.periods); None for eternity."""
    if period == "minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if period == "hour":
        return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return midnight + timedelta(days=1)
    if period == "week":
        return midnight + timedelta(days=7 - now.weekday())  # the next Monday 00:00
    if period == "month":
        days = calendar.monthrange(now.year, now.month)[1]
        return midnight.replace(day=1) + timedelta(days=days)
    if period == "year":
        return midnight.replace(month=1, day=1, year=now.year + 1)
    if period == "eternity":
        return None
    raise ValueError(period)


def seconds_left(period: str, at: float) -> float:
    end = window_end(period, datetime.fromtimestamp(at, UTC))
    assert end is not None
    return end.timestamp() - at


def stay_inside_minute(margin: float = 10.0) -> None:
    """Sleep past the next UTC minute boundary if fewer than ``margin`` seconds remain, so that
    a test counting on a per-minute limit does not see its window reset half way."""
    left = seconds_left("minute", time.time())
    if left < margin:
        time.sleep(left + 0.2)


def reset_bracket(period: str, before: float, after: float) -> range:
    """Every reset a gateway may report (whole seconds, rounded up) for an instant between
    ``before`` and ``after``."""
    return range(
        math.ceil(seconds_left(period, after)), math.ceil(seconds_left(period, before)) + 1
    )


def unique_prefix() -> str:
    return f"meshgate-e2e-{uuid.uuid4().hex[:12]}"


def drop_keys(url: str, prefix: str) -> None:
    """Delete what a test wrote under its own key prefix on the shared Redis."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except (redis.RedisError, OSError):
        pass
    finally:
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free port, stopped and started at will."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("no redis-server on PATH to run a private Redis")
        assert binary is not None
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.popen = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)

        def answers() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.popen.returncode}")
            try:
                return bool(client.ping())
            except (redis.RedisError, OSError):
                return False

        try:
            wait_for(answers, what=f"private redis-server on {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None


@contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serving_workers(gw: Gateway) -> int:
    """How many worker processes have logged that they serve (they share the stderr file)."""
    return gw.proc.stderr().count("gateway serving on")
