"""Usage reporting on the Redis backend: a gateway killed mid-load loses nothing (another
gateway collects what it counted), a killed collector's pending batch is sent again with
the same id, and a limited request's usage rides in its check script (no command of its own).
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from harness import echo_upstream, shared_redis_url, within
from usage_support import Receiver, product, usage_gateway

APPS = [
    {"id": "app1", "plan": "big", "keys": ["k1"]},  # a limit on hits: the check script counts
    {"id": "app3", "plan": "free", "keys": ["k3"]},  # no limit: usage posted on its own
]


@pytest.fixture
def redis_limits() -> Iterator[dict[str, Any]]:
    url = shared_redis_url()
    prefix = f"usagetest-{uuid.uuid4().hex[:10]}"
    yield {"backend": "redis", "redis_url": url, "key_prefix": prefix}
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with echo_upstream(tmp_path) as port:
        rx = Receiver({"version": "v1", "products": [product(port, APPS)]})
        yield rx
        rx.stop()


def _usage_keys(limits: dict[str, Any]) -> list[bytes]:
    client = redis.Redis.from_url(limits["redis_url"])
    try:
        return sorted(client.scan_iter(match=f"{limits['key_prefix']}:usage:*"))
    finally:
        client.close()


def test_a_gateway_killed_mid_load_loses_nothing(
    receiver: Receiver, redis_limits: dict[str, Any], tmp_path: Path
) -> None:
    observed: Counter[tuple[str, int]] = Counter()
    broken = Counter[str]()
    lock = threading.Lock()
    stop = threading.Event()

    def load(port: int, path: str, key: str | None, app: str) -> None:
        headers = {"X-API-Key": key} if key else {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while not stop.is_set():
                try:
                    status = client.get(path, headers=headers).status_code
                except httpx.HTTPError:
                    with lock:
                        broken[app] += 1  # in flight when the gateway died: either way
                    return
                with lock:
                    observed[(app, status)] += 1

    with usage_gateway(tmp_path, receiver, name="gwA", limits=redis_limits) as gw:
        threads = [
            threading.Thread(target=load, args=(gw.port, "/echo/a", "k1", "app1")),
            threading.Thread(target=load, args=(gw.port, "/echo/search", "k3", "app3")),
            threading.Thread(target=load, args=(gw.port, "/echo/a", None, "")),
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        gw.proc.kill()  # SIGKILL, requests in flight
        stop.set()
        for thread in threads:
            thread.join()
    assert observed[("app1", 200)] > 50 and observed[("app3", 200)] > 50
    # Another gateway collects what the killed one counted; its graceful stop takes all.
    with usage_gateway(tmp_path, receiver, name="gwB", limits=redis_limits):
        time.sleep(1.2)  # the killed gateway's collector lock expires
    usage, responses = receiver.usage(), receiver.responses()

    def between(reported: int, app: str, seen: int) -> None:
        assert seen <= reported <= seen + broken[app], (app, reported, seen, broken[app])

    between(usage[("echo", "app1", "hits")], "app1", observed[("app1", 200)])
    between(usage[("echo", "app3", "search")], "app3", observed[("app3", 200)])
    assert usage[("echo", "app3", "hits")] == usage[("echo", "app3", "search")]
    between(responses[("echo", "app1", 200, "ok")], "app1", observed[("app1", 200)])
    between(responses[("echo", "app3", 200, "ok")], "app3", observed[("app3", 200)])
    between(responses[("echo", "", 401, "unauthenticated")], "", observed[("", 401)])
    assert set(responses) == {
        ("echo", "app1", 200, "ok"),
        ("echo", "app3", 200, "ok"),
        ("echo", "", 401, "unauthenticated"),
    }
    # Everything was collected and acknowledged: nothing left in Redis but the bookkeeping.
    left = [k for k in _usage_keys(redis_limits) if not re.search(rb":usage:(mark|seq|origin)$", k)]
    assert left == []
    assert receiver.duplicates == 0


def test_a_killed_collectors_pending_batch_is_sent_again_with_its_id(
    receiver: Receiver, redis_limits: dict[str, Any], tmp_path: Path
) -> None:
    prefix = redis_limits["key_prefix"]
    client = redis.Redis.from_url(redis_limits["redis_url"])
    minute = int(time.time()) // 60 * 60 - 300  # closed long ago: collected at once
    client.hset(
        f"{prefix}:usage:{minute}",
        mapping={'["u","echo","app1","hits"]': 7, '["r","echo","app1",200,true]': 7},
    )
    receiver.mode = "fail"
    with usage_gateway(tmp_path, receiver, name="gwA", limits=redis_limits) as gw:
        within(5, lambda: receiver.attempts, "the batch built and sent (refused with 503)")
        gw.proc.kill()
    [batch_id] = set(receiver.attempts)
    [pending] = client.zrange(f"{prefix}:usage:outbox", 0, -1)
    assert client.exists(pending) and client.exists(f"{prefix}:usage:{minute}") == 0
    receiver.mode = "ok"
    with usage_gateway(tmp_path, receiver, name="gwB", limits=redis_limits):
        within(10, lambda: batch_id in receiver.batches, "resent by the next collector")
        batch = receiver.batches[batch_id]
        assert batch["usage"] == [["echo", "app1", "hits", minute, 7]]
        assert batch["responses"] == [["echo", "app1", 200, "ok", minute, 7]]
        within(5, lambda: client.zcard(f"{prefix}:usage:outbox") == 0, "acknowledged")
        assert client.exists(pending) == 0
    # The killed gateway comes back with the batch still in its spool: sent, counted once.
    with usage_gateway(tmp_path, receiver, name="gwA", limits=redis_limits):
        within(10, lambda: receiver.duplicates == 1, "the spooled copy acknowledged")
    assert receiver.usage() == {("echo", "app1", "hits"): 7}
    client.close()


def _monitor(url: str, lines: list[str], ready: threading.Event, done: threading.Event) -> None:
    options = redis.connection.parse_url(url)
    with socket.create_connection(
        (options.get("host", "127.0.0.1"), options.get("port", 6379)), timeout=10
    ) as sock:
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        while not done.is_set() or buffer:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\r\n")
            for line in complete:
                if line == b"+OK":
                    ready.set()
                else:
                    lines.append(line.decode("utf-8", "replace"))
            if done.is_set():
                sock.settimeout(0.3)


def test_a_limited_requests_usage_rides_in_its_check_script(
    receiver: Receiver, redis_limits: dict[str, Any], tmp_path: Path
) -> None:
    prefix = redis_limits["key_prefix"]
    with usage_gateway(tmp_path, receiver, limits=redis_limits) as gw:
        assert gw.get("/echo/a", "k1") == 200  # connections and scripts set up
        time.sleep(0.2)
        lines: list[str] = []
        ready, done = threading.Event(), threading.Event()
        watcher = threading.Thread(
            target=_monitor, args=(redis_limits["redis_url"], lines, ready, done)
        )
        watcher.start()
        assert ready.wait(5)
        for _ in range(20):
            assert gw.get("/echo/a", "k1") == 200
        for _ in range(5):
            assert gw.get("/echo/search", "k3") == 200
        time.sleep(0.3)
        done.set()
        watcher.join()
    ours = [line for line in lines if prefix in line]
    client = [line for line in ours if "lua]" not in line]
    in_script = [line for line in ours if "lua]" in line]
    usage = '\\"u\\"'

    def count(lines: list[str], command: str, *parts: str) -> int:
        return sum(1 for line in lines if f'"{command}"' in line and all(p in line for p in parts))

    # app1: one EVALSHA a request carrying its usage, no usage command of its own.
    assert count(client, "EVALSHA", "app1", usage) == 20
    assert count(client, "HINCRBY", "app1", usage) == 0
    assert count(in_script, "HINCRBY", "app1", usage) == 20
    # app3 has no limit to check: its usage is posted (search and its parent hits).
    assert count(client, "HINCRBY", "app3", usage) == 10
    assert count(client, "EVALSHA", "app3") == 0
    # A 200 from the backend is the presumed answer: counted with the usage (in the script,
    # or in the posted usage), never by a command of its own.
    response = '\\"r\\"'
    assert count(client, "HINCRBY", "app1", response) == 0
    assert count(in_script, "HINCRBY", "app1", response) == 20
    assert count(client, "HINCRBY", "app3", response) == 5
