"""Endpoint propagation: how soon a change in the control plane's registry shows in a
sidecar's traffic.

A control plane (``meshgate control``) holds ``--bulk`` registered instances of a service
``bulk`` (background load: never called, kept alive by heartbeats as their sidecars would)
and two real instances of ``target`` (nginx servers that log each request's arrival time,
``$msec``). A caller's sidecar follows the registry's endpoint stream and calls ``target``
continuously (wrk, paced to ``--rate``, on its local port). Then, ``--cycles`` times:

- **removal**: one target's registration is deleted (``DELETE /dp/v1/mesh/instances/ID``);
  measured: from the DELETE to the last request that reaches that server;
- **addition**: the same server is registered again (``POST``, a new instance for the
  registry); measured: from the POST to the first request that reaches it;
- **kill**: an instance fronted by its own sidecar (registered by that sidecar, its
  endpoint stream bound to it) is killed with SIGKILL; measured: from the kill to the
  moment the caller's sidecar no longer lists it (its admin ``/clusters``, polled).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gateway.run import (
    LOAD_CORE,
    PROXY_CORE,
    BenchError,
    Server,
    _die_with_parent,
    free_port,
    pace_script,
    parse_wrk,
    progress,
    start_nginx,
    wait_ready,
)
from bench.mesh.processes import Sidecar

ADMIN_TOKEN = "mesh-bench-admin"  # registered by the control plane on start
ENV = "production"
GAP_S = 1.5  # seconds between two changes: each must have propagated well within it
POLL_S = 0.02  # how often the caller's endpoint list is read after a kill

# A server that logs when each request arrived (seconds, ms resolution).
TARGET_BODY = """\
  log_format arrivals '$msec';
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    access_log {log} arrivals;
    location / {{ default_type text/plain; return 200 'ok'; }}
  }}
"""


class ControlPlane:
    """A keep-alive JSON client of the control plane's API with one token."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.token = token

    def call(self, method: str, path: str, doc: object = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise BenchError(f"control plane: {method} {path} failed: {exc}") from None
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def register(self, service: str, port: int) -> tuple[str, float]:
        """A new registration of 127.0.0.1:``port`` as a ready instance: its id and ttl."""
        status, doc = self.call(
            "POST",
            "/dp/v1/mesh/instances",
            {
                "env": ENV,
                "service": service,
                "address": "127.0.0.1",
                "port": port,
                "version": "v1",
                "zone": "",
                "labels": {},
                "weight": 1,
                "ready": True,
            },
        )
        if status in (404, 405):
            raise BenchError(
                "this control plane has no registry (POST /dp/v1/mesh/instances answered "
                f"{status}); run it from a tree that has one with --control-src DIR/src"
            )
        if status not in (200, 201) or not isinstance(doc, dict) or "id" not in doc:
            raise BenchError(f"registration of {service} refused: HTTP {status}: {doc}")
        return str(doc["id"]), float(doc.get("ttl", 10.0))

    def deregister(self, instance: str) -> None:
        status, doc = self.call("DELETE", f"/dp/v1/mesh/instances/{instance}")
        if status not in (200, 204):
            raise BenchError(f"DELETE of instance {instance} answered {status}: {doc}")


class Heartbeats:
    """Keeps registrations alive as their sidecars would: each gets a heartbeat every
    ttl/3. Several senders, each with its own connection and share of the registrations,
    so that a round is bounded by the control plane rather than by one round trip after
    another."""

    def __init__(self, port: int, token: str, ttl: float, senders: int = 4) -> None:
        self.period = ttl / 3
        self.shares: list[set[str]] = [set() for _ in range(senders)]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.slowest_round_s = 0.0
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._send, args=(ControlPlane(port, token), share))
            for share in self.shares
        ]

    def add(self, instance: str) -> None:
        with self.lock:
            min(self.shares, key=len).add(instance)

    def forget(self, instance: str) -> None:
        with self.lock:
            for share in self.shares:
                share.discard(instance)

    def start(self) -> None:
        for thread in self.threads:
            thread.daemon = True
            thread.start()

    def _send(self, client: ControlPlane, share: set[str]) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            with self.lock:
                ids = list(share)
            for instance in ids:
                with self.lock:
                    if instance not in share:
                        continue
                try:
                    status, doc = client.call(
                        "PUT", f"/dp/v1/mesh/instances/{instance}", {"ready": True}
                    )
                except BenchError as exc:
                    status, doc = 0, str(exc)
                if status != 200 and len(self.failures) < 5:
                    self.failures.append(f"heartbeat of {instance}: {status} {doc}")
            took = time.monotonic() - start
            self.slowest_round_s = max(self.slowest_round_s, took)
            self.stopping.wait(max(0.0, self.period - took))

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)


@dataclass
class Propagation:
    control_source: str
    bulk: int
    ttl_s: float
    register_bulk_s: float  # registering the bulk instances, one POST after another
    initial_sync_ms: float  # caller sidecar started -> it lists every instance
    removal_ms: list[float] = field(default_factory=list)
    addition_ms: list[float] = field(default_factory=list)
    kill_ms: list[float] = field(default_factory=list)
    requests: int = 0
    rps: float = 0.0
    failed_requests: int = 0  # non-2xx and socket errors of the caller's load
    slowest_heartbeat_round_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> list[str]:
        def row(event: str, measured: str, values: list[float]) -> str:
            if not values:
                return f"| {event} | {measured} | 0 | — | — | — |"
            return (
                f"| {event} | {measured} | {len(values)} | {statistics.median(values):.1f} "
                f"| {min(values):.1f} | {max(values):.1f} |"
            )

        out = [
            f"Endpoint propagation: control plane from {self.control_source}, {self.bulk:,} "
            f"registered instances of `bulk` (heartbeats every {self.ttl_s / 3:.1f} s, a "
            f"round of them took up to {self.slowest_heartbeat_round_s:.1f} s) plus 2 of "
            f"`target`; the caller's sidecar called `target` at {self.rps:,.0f} req/s "
            f"({self.requests:,} requests, {self.failed_requests} failed). Registering the "
            f"{self.bulk:,} took {self.register_bulk_s:.1f} s; the caller's sidecar listed "
            f"them all {self.initial_sync_ms:,.0f} ms after it was started.",
            "",
            "| event | measured until | samples | median ms | min ms | max ms |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            row("DELETE of a registration", "the last request reaching it", self.removal_ms),
            row("POST of a new registration", "its first request", self.addition_ms),
            row("SIGKILL of an instance's sidecar", "gone from the caller's list", self.kill_ms),
            "",
            "Times are wall-clock ms from just before the call (or the kill) to a request's "
            "arrival in the server's log ($msec, 1 ms resolution) or to the first poll "
            f"({POLL_S * 1000:.0f} ms apart) of the caller's /clusters without the instance. "
            "At the caller's rate each instance sees a request every "
            f"{2000 / max(self.rps, 1):.1f} ms or so: a finer figure cannot be seen.",
        ]
        out += [f"Note: {n}" for n in self.notes]
        return out


def _arrivals(log: Path) -> list[float]:
    try:
        return [float(x) for x in log.read_text().split()]
    except (OSError, ValueError):
        return []


def _start_target(name: str, workdir: Path, track: Callable[[Server], Server]) -> tuple[int, Path]:
    port = free_port()
    log = workdir / f"{name}-arrivals.log"
    server = track(start_nginx(name, TARGET_BODY.format(port=port, log=log), LOAD_CORE, workdir))
    wait_ready(server, port)
    log.write_text("")  # the readiness check's own request does not count
    return port, log


def _wait(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> float:
    """Poll ``check`` until true; the seconds it took. ``what`` says what failed (a function:
    what it says when the time is up)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            said = what() if callable(what) else what
            raise BenchError(f"{said} after {timeout:g} s")
        time.sleep(0.01)
    return time.monotonic() - start


def measure_propagation(
    args: argparse.Namespace, workdir: Path, track: Callable[[Server], Server]
) -> Propagation:
    targets = [_start_target(f"target-{i}", workdir, track) for i in (1, 2)]
    port = free_port()
    command = [sys.executable, "-m", "meshgate", "control", "--listen", f"127.0.0.1:{port}"]
    command += ["--data-dir", str(workdir / "control"), "--admin-token", ADMIN_TOKEN]
    command += ["--log-level", "WARNING"]
    source = "this tree"
    if args.control_src is not None:
        command = ["env", f"PYTHONPATH={args.control_src.resolve()}", *command]
        source = str(args.control_src)
    control = track(Server("control-plane", command, PROXY_CORE, workdir))
    admin = ControlPlane(port, ADMIN_TOKEN)

    def answers() -> bool:
        control.check_alive()
        try:
            return admin.call("GET", "/admin/api/tokens")[0] == 200
        except BenchError:
            return False

    _wait(answers, 30, "the control plane does not answer")
    status, doc = admin.call(
        "POST", "/admin/api/tokens", {"name": "mesh-bench", "scopes": ["dataplane"]}
    )
    if status != 201 or not isinstance(doc, dict):
        raise BenchError(f"cannot create a dataplane token: HTTP {status}: {doc}")
    token = str(doc["token"])
    plane = ControlPlane(port, token)

    progress(f"propagation: registering {args.bulk} instances of bulk")
    start = time.monotonic()
    first, ttl = plane.register("bulk", 30000)
    heartbeats = Heartbeats(port, token, ttl)
    heartbeats.add(first)
    heartbeats.start()
    for i in range(1, args.bulk):
        heartbeats.add(plane.register("bulk", 30000 + i)[0])
    register_bulk_s = time.monotonic() - start
    target_ids = [plane.register("target", p)[0] for p, _ in targets]
    for instance in target_ids:
        heartbeats.add(instance)

    local = free_port()
    cp_flags = ["--control-plane", f"http://127.0.0.1:{port}", "--token", token]
    started = time.monotonic()
    caller = Sidecar(
        "caller",
        # No app beside it: the readiness probe checks a target server.
        {
            "service": "caller",
            "app_port": targets[0][0],
            "upstreams": [{"service": "target", "local_port": local}],
        },
        [],
        PROXY_CORE,
        workdir,
        extra=cp_flags,
    )
    track(caller.server)

    listed = {"bulk": 0, "target": 0}

    def synced() -> bool:
        caller.server.check_alive()
        try:
            clusters = caller.admin_get("/clusters")
        except (OSError, BenchError):
            return False
        listed.update({name: len(clusters.get(name, ())) for name in listed})
        return listed == {"bulk": args.bulk, "target": 2}

    _wait(
        synced,
        60,
        lambda: (
            f"the caller's sidecar lists {listed['bulk']} of the {args.bulk} bulk and "
            f"{listed['target']} of the 2 target instances"
        ),
    )
    result = Propagation(
        control_source=source,
        bulk=args.bulk,
        ttl_s=ttl,
        register_bulk_s=register_bulk_s,
        initial_sync_ms=(time.monotonic() - started) * 1000,
    )

    connections = args.paced_connections
    wrk_args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", "-d3600s"]
    wrk_args += ["--latency", "-s", str(pace_script(workdir, connections * 1000 / args.rate))]
    load = subprocess.Popen(
        [*wrk_args, f"http://127.0.0.1:{local}/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,
    )
    try:
        (port2, log2), instance = targets[1], target_ids[1]
        for cycle in range(args.cycles):
            time.sleep(GAP_S)
            heartbeats.forget(instance)
            removed = time.time()
            plane.deregister(instance)
            time.sleep(GAP_S)
            added = time.time()
            instance = plane.register("target", port2)[0]
            heartbeats.add(instance)
            time.sleep(GAP_S)
            arrivals = _arrivals(log2)
            before = [t for t in arrivals if t < added]
            after = [t for t in arrivals if t >= added]
            if not before or max(before) < removed - 1:
                result.notes.append(f"cycle {cycle + 1}: no request reached the removed target")
            elif max(before) > added - GAP_S / 4:
                result.notes.append(
                    f"cycle {cycle + 1}: requests still reached the removed target "
                    f"{(max(before) - removed) * 1000:.0f} ms after its DELETE"
                )
            else:
                result.removal_ms.append(max(0.0, (max(before) - removed) * 1000))
            if after:
                result.addition_ms.append(max(0.0, (min(after) - added) * 1000))
            else:
                result.notes.append(f"cycle {cycle + 1}: the new registration got no request")
            progress(
                f"propagation cycle {cycle + 1}: removal {result.removal_ms[-1:]} ms, "
                f"addition {result.addition_ms[-1:]} ms"
            )
        for cycle in range(args.cycles):
            result.kill_ms.append(_kill_one(workdir, track, cp_flags, caller))
            progress(f"propagation, kill {cycle + 1}: {result.kill_ms[-1]:.0f} ms")
    finally:
        load.send_signal(2)  # SIGINT: wrk stops and prints its summary
        try:
            output, _ = load.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            load.kill()
            output, _ = load.communicate()
        heartbeats.stop()
    summary = parse_wrk(output, connections, None)
    result.requests, result.rps = summary.requests, summary.rps
    result.failed_requests = summary.non_2xx + summary.socket_errors
    result.slowest_heartbeat_round_s = heartbeats.slowest_round_s
    result.notes += heartbeats.failures
    if result.kill_ms and statistics.median(result.kill_ms) > ttl * 500:
        result.notes.append(
            f"a killed instance left the caller's list after "
            f"{statistics.median(result.kill_ms) / 1000:.1f} s, most of the {ttl:g} s ttl: "
            "its registration expired rather than leaving with its sidecar's endpoint stream"
        )
    if heartbeats.slowest_round_s > ttl * 0.8:
        result.notes.append(
            f"a round of heartbeats took {heartbeats.slowest_round_s:.1f} s of the {ttl:g} s "
            "ttl: registrations may have expired"
        )
    return result


def _kill_one(
    workdir: Path, track: Callable[[Server], Server], cp_flags: list[str], caller: Sidecar
) -> float:
    """Start an instance of ``target`` with its own sidecar (registered by it), wait until
    the caller lists it, SIGKILL the sidecar: ms until the caller no longer lists it."""
    app_port, _ = _start_target(f"target-killed-{free_port()}", workdir, track)
    sidecar = Sidecar(
        f"target-sidecar-{app_port}",
        {"service": "target", "app_port": app_port},
        [],
        PROXY_CORE,
        workdir,
        extra=cp_flags,
    )
    track(sidecar.server)
    address = f"127.0.0.1:{sidecar.inbound}"
    _wait(
        lambda: address in caller.endpoints("target"),
        30,
        "the caller does not list an instance registered by its own sidecar",
    )
    time.sleep(GAP_S)
    killed = time.monotonic()
    sidecar.server.popen.kill()
    sidecar.server.popen.wait()
    while address in caller.endpoints("target"):
        if time.monotonic() - killed > 60:
            raise BenchError("a killed instance stayed in the caller's endpoints for 60 s")
        time.sleep(POLL_S)
    return (time.monotonic() - killed) * 1000
