"""Discovery through the control plane's registry: instances that start, drain, are killed
and come back are seen by every sidecar within a second; configuration is promoted."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from harness import within
from mesh_support import (
    App,
    SidecarProc,
    attached_sidecar,
    running,
    served_by,
    start_app,
    start_control_plane,
)


class Caller(threading.Thread):
    """Calls a service through a sidecar without pause; counts who answered, and failures."""

    def __init__(self, sidecar: SidecarProc, url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(proxy=sidecar.proxy, timeout=10)
        self.url = url
        self.seen: Counter[str] = Counter()
        self.last: dict[str, float] = {}
        self.failures: list[str] = []
        self.failed_at: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                r = self.client.get(self.url)
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                self.failed_at.append(time.monotonic())
                continue
            if r.status_code != 200:
                self.failures.append(f"{r.status_code} {r.text[:200]}")
                self.failed_at.append(time.monotonic())
                continue
            who = r.headers["x-served-by"]
            self.seen[who] += 1
            self.last[who] = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.client.close()


def test_instances_come_and_go_and_every_sidecar_follows(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    caller_app = start_app(tmp_path, "orders")
    caller = attached_sidecar(tmp_path, cp, "orders", caller_app.port)
    instances: list[tuple[App, SidecarProc]] = []

    def add(version: str) -> tuple[App, SidecarProc]:
        app = start_app(tmp_path, "payments", version)
        sidecar = attached_sidecar(tmp_path, cp, "payments", app.port, "--version", version)
        instances.append((app, sidecar))
        return app, sidecar

    try:
        a, _ = add("v1")
        b, b_sidecar = add("v1")
        load = Caller(caller, "http://payments/pay")
        load.start()
        within(5, lambda: {a.instance, b.instance} <= set(load.seen), "both instances seen")
        # A new instance gets its first request within a second of registering.
        c, c_sidecar = add("v2")
        registered = time.monotonic()
        took = within(5, lambda: c.instance in load.seen, "the new instance reached")
        assert took < 1.5, took
        _ = registered
        # SIGTERM drains: the instance leaves the registry first, nothing fails.
        b_sidecar.proc.stop()
        stopped = time.monotonic()
        b.proc.stop()
        time.sleep(1.0)
        assert load.last[b.instance] < stopped + 0.5
        drained_failures = list(load.failures)
        # SIGKILL of a sidecar and its app: gone from every sidecar within about a second.
        kill_at = time.monotonic()
        c_sidecar.proc.kill()
        c.proc.kill()
        killed = time.monotonic()
        c_address = f"127.0.0.1:{c_sidecar.inbound}"

        def known() -> set[str]:
            return {e["address"] for e in caller.clusters().get("payments", [])}

        took = within(3, lambda: c_address not in known(), "the killed instance forgotten")
        assert took < 1.5, took
        assert c_address.rpartition(":")[2] not in {str(i["port"]) for i in cp.instances()}
        assert load.last[c.instance] - killed < 1.2
        load.stop()
        assert drained_failures == [], drained_failures[:5]
        # The one request in flight to the killed instance, if one was, breaks (a reset after
        # it was sent is retried only when a route asks); nothing else fails.
        late = [t for t in load.failed_at if not kill_at <= t <= killed + 0.5]
        assert len(load.failures) <= 1 and not late, load.failures[:5]
        # It comes back.
        c2, _ = add("v2")
        with caller.client() as client:
            within(
                5,
                lambda: client.get("http://payments/x").headers["x-served-by"] == c2.instance,
                "back",
            )
        names = {i["address"] + ":" + str(i["port"]) for i in cp.instances("payments")}
        assert len(names) == 2
    finally:
        for app, sidecar in instances:
            sidecar.proc.stop()
            app.proc.stop()
        caller.proc.stop()
        caller_app.proc.stop()
        cp.stop()


def test_an_app_that_never_becomes_ready_never_gets_traffic(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    caller_app = start_app(tmp_path, "orders")
    caller = attached_sidecar(tmp_path, cp, "orders", caller_app.port)
    good = start_app(tmp_path, "payments")
    good_sidecar = attached_sidecar(tmp_path, cp, "payments", good.port)
    # This one's app never listens.
    bad_sidecar = attached_sidecar(tmp_path, cp, "payments", 1, wait_ready=False)
    with running(caller_app, caller, good, good_sidecar, bad_sidecar):
        time.sleep(1.0)
        assert httpx.get(f"{bad_sidecar.admin_url}/readyz", timeout=5).status_code == 503
        with caller.client() as client:
            answers = [client.get("http://payments/x") for _ in range(20)]
        assert served_by(answers) == {good.instance: 20}
        listed = cp.instances("payments")
        assert len(listed) == 2 and sorted(i["ready"] for i in listed) == [False, True]
    cp.stop()


def test_traffic_configuration_from_the_control_plane(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    caller_app = start_app(tmp_path, "orders")
    caller = attached_sidecar(tmp_path, cp, "orders", caller_app.port)
    v1 = start_app(tmp_path, "reviews", "v1")
    v2 = start_app(tmp_path, "reviews", "v2")
    s1 = attached_sidecar(tmp_path, cp, "reviews", v1.port, "--version", "v1")
    s2 = attached_sidecar(tmp_path, cp, "reviews", v2.port, "--version", "v2")
    with running(caller_app, caller, v1, v2, s1, s2), caller.client() as client:
        within(
            5,
            lambda: (
                len({client.get("http://reviews/").headers["x-served-by"] for _ in range(4)}) == 2
            ),
            "both",
        )
        cp.put_service(
            {
                "name": "reviews",
                "subsets": [{"name": "v2", "labels": {"version": "v2"}}],
                "routes": [{"destinations": [{"subset": "v2"}]}],
            }
        )
        within(
            3,
            lambda: (
                served_by([client.get("http://reviews/") for _ in range(6)]) == {v2.instance: 6}
            ),
            "v2 only",
        )
        # A configuration the control plane refuses never reaches the sidecar.
        r = cp.api.put(
            "/mesh/services/reviews", json={"name": "reviews", "routes": [{"timeout": -1}]}
        )
        assert r.status_code == 422
        assert served_by([client.get("http://reviews/") for _ in range(6)]) == {v2.instance: 6}
    cp.stop()
