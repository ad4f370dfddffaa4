"""The mesh's registry and endpoint streams on a real control plane on loopback: sidecars
register, heartbeat and leave; every stream sees each change within a second; an instance
whose sidecar dies leaves with its stream's connection; limits, ownership and bad input are
refused with problems. The registry is soft state, so SQLite is enough here."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_support import TOKEN, ControlPlane, problem, start_control

from meshgate.config.mesh import Instance
from meshgate.control._registry import Registry, RegistrySettings

TTL = 1.5
View = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane whose registrations live 1.5 s without a heartbeat (grace 1 s); each
    test uses service names of its own."""
    workdir = tmp_path_factory.mktemp("mesh-registry")
    cp = start_control(workdir, f"sqlite:///{workdir / 'control.db'}", None, "--mesh-ttl", str(TTL))
    yield cp
    cp.stop()


def dp(
    cp: ControlPlane, method: str, path: str, token: str = TOKEN, **kwargs: Any
) -> httpx.Response:
    return httpx.request(
        method,
        f"{cp.url}/dp/v1/mesh{path}",
        headers={"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})},
        timeout=30,
        **kwargs,
    )


def register(
    cp: ControlPlane, service: str, address: str, token: str = TOKEN, **fields: Any
) -> str:
    body = {"service": service, "address": address, "port": 8080, **fields}
    response = dp(cp, "POST", "/instances", token, json=body)
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"id", "ttl"}
    return str(response.json()["id"])


def listed(cp: ControlPlane, service: str, env: str = "production") -> list[dict[str, Any]]:
    response = cp.api.get("/mesh/instances", params={"env": env, "service": service})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def dataplane_token(cp: ControlPlane, name: str) -> str:
    return str(cp.post("/tokens", {"name": name, "scopes": ["dataplane"]})["token"])


class Stream:
    """An endpoint stream read with httpx in a thread: its events as they arrive, and the
    endpoints they add up to (the snapshot, then each update's services)."""

    def __init__(
        self,
        cp: ControlPlane,
        env: str = "production",
        instance: str | None = None,
        last_event_id: str | None = None,
        token: str = TOKEN,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        params = {"env": env, **({"instance": instance} if instance else {})}
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self._context = self.client.stream(
            "GET", f"{cp.url}/dp/v1/mesh/endpoints", params=params, headers=headers
        )
        self.response = self._context.__enter__()
        self.items: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.view: View = {}
        self.version = 0
        self.comments: list[str] = []
        if self.response.status_code == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.response.read()  # a problem

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines():
                if line == "":
                    if "data" in fields:
                        self.items.put({**fields, "at": time.monotonic()})
                    fields = {}
                elif line.startswith(":"):
                    self.comments.append(line[1:].strip())
                else:
                    key, _, value = line.partition(":")
                    fields[key] = value.removeprefix(" ")
        except (httpx.HTTPError, OSError, RuntimeError):
            pass
        self.items.put(None)

    def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next event, applied to the view; fails after ``timeout`` seconds."""
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s; view {self.view}") from None
        assert item is not None, "the stream ended"
        return self._apply(item)

    def _apply(self, item: dict[str, Any]) -> dict[str, Any]:
        data = json.loads(item["data"])
        assert item["id"] == str(data["version"]), item
        assert data["version"] > self.version, (data["version"], self.version)
        self.version = data["version"]
        if item["event"] == "snapshot":
            self.view = dict(data["services"])
        else:
            assert item["event"] == "update", item
            self.view.update(data["services"])
        return {"event": item["event"], "data": data, "at": item["at"]}

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """The events of the next ``seconds``."""
        events = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.items.get(timeout=left)
            except queue.Empty:
                break
            if item is not None:
                events.append(self._apply(item))
        return events

    def until(self, check: Callable[[View], bool], timeout: float = 5.0) -> float:
        """When the view came to satisfy ``check`` (now, if it does already)."""
        deadline = time.monotonic() + timeout
        while not check(self.view):
            event = self.next(max(0.01, deadline - time.monotonic()))
            if check(self.view):
                return float(event["at"])
        return time.monotonic()

    def ids(self, service: str) -> set[str]:
        return {i["id"] for i in self.view.get(service, [])}

    def close(self) -> None:
        """Close the connection at once (httpx alone would wait for the reading thread)."""
        network = self.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._context.__exit__(None, None, None)
        self.client.close()


class Heartbeats:
    """A sidecar's heartbeat loop, every ``every`` seconds until stopped or answered 404."""

    def __init__(self, cp: ControlPlane, instance: str, every: float = 0.3) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(every):
                status = dp(cp, "PUT", f"/instances/{instance}", json={"ready": True}).status_code
                self.statuses.append(status)
                if status == 404:
                    return

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_registration_reaches_every_stream_within_a_second_and_a_removal_too(
    plane: ControlPlane,
) -> None:
    watchers = [Stream(plane), Stream(plane)]
    try:
        for watcher in watchers:
            assert watcher.response.headers["content-type"].startswith("text/event-stream")
            assert watcher.next()["event"] == "snapshot"
        sent = time.monotonic()
        fields = {"version": "v1", "zone": "z1", "labels": {"team": "a"}, "weight": 3}
        instance = register(plane, "ratings-a", "10.1.0.1", **fields)
        for watcher in watchers:
            seen = watcher.until(lambda v: bool(v.get("ratings-a")))
            print(f"registration seen after {1000 * (seen - sent):.1f} ms")
            assert seen - sent < 1.0
            assert watcher.view["ratings-a"] == [
                {"id": instance, "address": "10.1.0.1", "port": 8080, **fields}
            ]
        [item] = listed(plane, "ratings-a")
        assert item["source"] == "registered" and item["ready"] is True
        assert item["owner"] == "bootstrap" and item["last_heartbeat"]

        # An update carries only the services that changed, each as its complete list.
        other = register(plane, "ratings-a", "10.1.0.2")
        event = watchers[0].next()
        assert event["event"] == "update" and list(event["data"]["services"]) == ["ratings-a"]
        assert [i["id"] for i in event["data"]["services"]["ratings-a"]] == [instance, other]

        sent = time.monotonic()
        assert dp(plane, "DELETE", f"/instances/{instance}").status_code == 204
        for watcher in watchers:
            seen = watcher.until(lambda v: [i["id"] for i in v["ratings-a"]] == [other])
            assert seen - sent < 1.0
        problem(dp(plane, "PUT", f"/instances/{instance}", json={"ready": True}), 404)
        problem(dp(plane, "DELETE", f"/instances/{instance}"), 404)
        assert dp(plane, "DELETE", f"/instances/{other}").status_code == 204
    finally:
        for watcher in watchers:
            watcher.close()


def test_heartbeats_keep_an_instance_and_without_them_it_expires_on_its_own(
    plane: ControlPlane,
) -> None:
    watcher = Stream(plane)
    try:
        watcher.next()
        instance = register(plane, "ratings-b", "10.1.1.1")
        watcher.until(lambda v: bool(v.get("ratings-b")))
        for _ in range(8):  # 3.2 s: twice the TTL
            time.sleep(0.4)
            beat = dp(plane, "PUT", f"/instances/{instance}", json={"ready": True})
            assert beat.status_code == 200 and beat.json() == {"ttl": TTL}
        assert watcher.ids("ratings-b") == {instance}
        last = time.monotonic()
        # No request from here on: the control plane expires it by itself.
        gone = watcher.until(lambda v: not v.get("ratings-b"), timeout=5)
        print(f"expired {gone - last:.2f} s after the last heartbeat (ttl {TTL})")
        assert TTL - 0.2 <= gone - last <= TTL + 1.0
        problem(dp(plane, "PUT", f"/instances/{instance}", json={"ready": True}), 404)
        assert listed(plane, "ratings-b") == []
    finally:
        watcher.close()


def test_an_instance_that_is_not_ready_is_registered_but_not_an_endpoint(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    watcher = Stream(cp)
    try:
        watcher.next()
        waiting = register(cp, "ratings-c", "10.1.2.1", ready=False)
        marker = register(cp, "ratings-c", "10.1.2.2")
        watcher.until(lambda v: bool(v.get("ratings-c")))
        assert watcher.ids("ratings-c") == {marker}
        assert {i["id"]: i["ready"] for i in listed(cp, "ratings-c")} == {
            waiting: False,
            marker: True,
        }
        assert dp(cp, "PUT", f"/instances/{waiting}", json={"ready": True}).status_code == 200
        watcher.until(lambda v: watcher.ids("ratings-c") == {waiting, marker})
        assert dp(cp, "PUT", f"/instances/{waiting}", json={"ready": False}).status_code == 200
        watcher.until(lambda v: watcher.ids("ratings-c") == {marker})
    finally:
        watcher.close()


def test_static_instances_of_the_stored_mesh_configuration_are_endpoints(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    service = {
        "instances": [{"address": "10.2.0.1", "port": 80}, {"address": "10.2.0.2", "port": 80}]
    }
    staging, production = Stream(cp, "staging"), Stream(cp)
    try:
        staging.next()
        production.next()
        legacy = {"name": "legacy", **service}
        assert cp.api.put("/mesh/services/legacy", json=legacy).status_code == 201
        staging.until(lambda v: len(v.get("legacy", [])) == 2)
        assert staging.view["legacy"][0] == {
            "id": "static:10.2.0.1:80",
            "address": "10.2.0.1",
            "port": 80,
            "version": "",
            "zone": "",
            "labels": {},
            "weight": 1,
        }
        assert "legacy" not in production.view  # staging's until promoted
        sent = time.monotonic()
        assert cp.api.post("/mesh/promote").json()["changed"] is True
        seen = production.until(lambda v: len(v.get("legacy", [])) == 2)
        assert seen - sent < 1.0
        assert {i["source"] for i in listed(cp, "legacy")} == {"static"}

        # A service declared without instances is there, empty; a sidecar's own registration
        # of a static address stands for it (the sidecar knows whether it is ready).
        sidecar = register(cp, "legacy", "10.2.0.2", port=80, ready=False)
        production.until(lambda v: production.ids("legacy") == {"static:10.2.0.1:80"})
        assert dp(cp, "PUT", f"/instances/{sidecar}", json={"ready": True}).status_code == 200
        production.until(lambda v: production.ids("legacy") == {"static:10.2.0.1:80", sidecar})
        empty = {"name": "empty"}
        assert cp.api.put("/mesh/services/empty", json=empty).status_code == 201
        staging.until(lambda v: v.get("empty") == [])
    finally:
        staging.close()
        production.close()


def test_last_event_id_resumes_with_only_what_changed_since(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    first = Stream(cp)
    kept = register(cp, "resume-a", "10.3.0.1")
    register(cp, "resume-c", "10.3.0.9")
    first.until(lambda v: bool(v.get("resume-a")) and bool(v.get("resume-c")))
    since = first.version
    first.close()

    added = register(cp, "resume-b", "10.3.0.2")
    more = register(cp, "resume-a", "10.3.0.3")
    resumed = Stream(cp, last_event_id=str(since))
    try:
        event = resumed.next()
        assert event["event"] == "update"
        assert event["data"]["version"] > since
        services = event["data"]["services"]
        assert set(services) == {"resume-a", "resume-b"}  # resume-c did not change
        assert {i["id"] for i in services["resume-a"]} == {kept, more}
        assert [i["id"] for i in services["resume-b"]] == [added]
    finally:
        resumed.close()

    # Up to date: nothing until the next change, which comes as an update.
    current = Stream(cp, last_event_id=str(event["data"]["version"]))
    try:
        assert current.quiet(0.5) == []
        register(cp, "resume-d", "10.3.0.4")
        assert current.next()["event"] == "update"
    finally:
        current.close()
    # A version this process never issued (from before a restart), or no version: a snapshot.
    for last in ("5", "abc", str(10**19)):
        fresh = Stream(cp, last_event_id=last)
        try:
            event = fresh.next()
            assert event["event"] == "snapshot"
            assert set(event["data"]["services"]) == {f"resume-{x}" for x in "abcd"}
        finally:
            fresh.close()


SIDECAR = """
import sys, httpx
url, token, instance = sys.argv[1:]
with httpx.stream("GET", url, params={"env": "production", "instance": instance},
                  headers={"Authorization": "Bearer " + token},
                  timeout=httpx.Timeout(10, read=None)) as response:
    for line in response.iter_lines():
        print(line, flush=True)
"""


def test_a_stream_bound_instance_leaves_a_second_after_its_sidecar_is_killed(
    plane: ControlPlane, tmp_path: Path
) -> None:
    instance = register(plane, "killed", "10.4.0.1")
    beats = Heartbeats(plane, instance)  # the TTL is not what removes it
    watcher = Stream(plane)
    sidecar = subprocess.Popen(
        [sys.executable, "-c", SIDECAR, f"{plane.url}/dp/v1/mesh/endpoints", TOKEN, instance],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sidecar.stdout is not None
        for line in sidecar.stdout:
            if line.startswith("event: snapshot"):
                break
        watcher.until(lambda v: watcher.ids("killed") == {instance})
        assert listed(plane, "killed")[0]["streams"] == 1
        time.sleep(2 * TTL)  # heartbeats and the open stream keep it
        assert watcher.ids("killed") == {instance}

        os.kill(sidecar.pid, signal.SIGKILL)
        killed = time.monotonic()
        gone = watcher.until(lambda v: not v.get("killed"), timeout=5)
        print(f"a killed sidecar's instance left after {gone - killed:.2f} s")
        assert 0.9 <= gone - killed <= 2.0
        time.sleep(0.5)
        assert beats.statuses[-1] == 404  # its next heartbeat: register again
    finally:
        sidecar.kill()
        sidecar.wait()
        beats.stop()
        watcher.close()


def raw_stream(cp: ControlPlane, instance: str) -> socket.socket:
    """A bound stream on a bare socket, read up to its snapshot."""
    sock = socket.create_connection(("127.0.0.1", cp.port))
    request = (
        f"GET /dp/v1/mesh/endpoints?env=production&instance={instance} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    sock.sendall(request.encode())
    received = b""
    while b"event: snapshot" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_a_new_stream_within_the_grace_keeps_the_instance(plane: ControlPlane) -> None:
    instance = register(plane, "restarted", "10.5.0.1")
    beats = Heartbeats(plane, instance)
    watcher = Stream(plane)
    try:
        watcher.until(lambda v: watcher.ids("restarted") == {instance})
        sock = raw_stream(plane, instance)
        # Closed abruptly (a reset, as when a process dies with unread data).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        time.sleep(0.3)
        again = Stream(plane, instance=instance)
        assert again.next()["event"] == "snapshot"
        events = watcher.quiet(2.0)
        assert not any("restarted" in e["data"]["services"] for e in events), events
        assert watcher.ids("restarted") == {instance}
        assert listed(plane, "restarted")[0]["streams"] == 1

        closed = time.monotonic()
        again.close()
        gone = watcher.until(lambda v: not v.get("restarted"), timeout=5)
        assert 0.9 <= gone - closed <= 2.0
    finally:
        beats.stop()
        watcher.close()


def test_the_limits_refuse_with_a_clear_problem(tmp_path: Path) -> None:
    cp = start_control(
        tmp_path,
        f"sqlite:///{tmp_path / 'control.db'}",
        None,
        "--mesh-max-instances",
        "4",
        "--mesh-max-instances-per-token",
        "3",
        "--mesh-max-streams",
        "2",
    )
    streams: list[Stream] = []
    try:
        other = dataplane_token(cp, "sidecars-b")
        mine = [register(cp, "capped", f"10.6.0.{n}") for n in range(3)]
        refused = problem(
            dp(
                cp,
                "POST",
                "/instances",
                json={"service": "capped", "address": "10.6.0.9", "port": 1},
            ),
            429,
        )
        assert "this token has 3 registered instances" in refused["detail"]
        # Registering an address again replaces it: allowed at the limit, a new id.
        again = register(cp, "capped", "10.6.0.0")
        assert again != mine[0]
        problem(dp(cp, "PUT", f"/instances/{mine[0]}", json={"ready": True}), 404)

        register(cp, "capped", "10.6.1.1", token=other)
        body = {"service": "capped", "address": "10.6.1.2", "port": 1}
        refused = problem(dp(cp, "POST", "/instances", other, json=body), 429)
        assert "the registry holds 4 instances, its limit" in refused["detail"]
        assert dp(cp, "DELETE", f"/instances/{again}").status_code == 204
        assert dp(cp, "POST", "/instances", other, json=body).status_code == 201
        assert len(listed(cp, "capped")) == 4

        streams = [Stream(cp), Stream(cp)]
        third = Stream(cp)
        streams.append(third)
        refused = problem(third.response, 429)
        assert "2 endpoint streams, its limit" in refused["detail"]
        streams[0].close()
        time.sleep(0.2)
        fourth = Stream(cp)
        streams.append(fourth)
        assert fourth.response.status_code == 200
    finally:
        for stream in streams:
            stream.close()
        cp.stop()


def test_a_token_cannot_touch_another_tokens_instance(plane: ControlPlane) -> None:
    other = dataplane_token(plane, "sidecars-foreign")
    instance = register(plane, "owned", "10.7.0.1")
    beat = {"ready": False}
    assert (
        "another token"
        in problem(dp(plane, "PUT", f"/instances/{instance}", other, json=beat), 403)["detail"]
    )
    problem(dp(plane, "DELETE", f"/instances/{instance}", other), 403)
    hijack = {"service": "owned", "address": "10.7.0.1", "port": 8080}
    problem(dp(plane, "POST", "/instances", other, json=hijack), 409, "body.address")
    foreign = Stream(plane, instance=instance, token=other)
    problem(foreign.response, 403, "query.instance")
    foreign.close()
    assert [i["ready"] for i in listed(plane, "owned")] == [True]  # untouched
    assert dp(plane, "PUT", f"/instances/{instance}", json={"ready": True}).status_code == 200

    reader = plane.post("/tokens", {"name": "reader-mesh", "scopes": ["read"]})["token"]
    problem(dp(plane, "POST", "/instances", reader, json=hijack), 403)
    problem(dp(plane, "PUT", "/instances/unknownid", json={"ready": True}), 404)
    unknown = Stream(plane, instance="unknownid")
    problem(unknown.response, 404, "query.instance")
    unknown.close()
    wrong_env = Stream(plane, env="staging", instance=instance)
    problem(wrong_env.response, 422, "query.env")
    wrong_env.close()
    assert dp(plane, "DELETE", f"/instances/{instance}").status_code == 204


def test_bad_bodies_are_refused_naming_the_field(plane: ControlPlane) -> None:
    good = {"service": "strict", "address": "10.8.0.1", "port": 8080}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "colour": "blue"}, "body.colour"),
        ({**good, "port": "8080"}, "body.port"),
        ({**good, "port": 0}, "body.port"),
        ({**good, "weight": 0}, "body.weight"),
        ({**good, "ready": "yes"}, "body.ready"),
        ({**good, "env": "qa"}, "body.env"),
        ({**good, "address": "no way"}, "body.address"),
        ({**good, "service": "Not_DNS"}, "body.service"),
        ({**good, "labels": {"ok": "bad value!"}}, "body.labels.ok"),
        ({**good, "version": "x" * 64}, "body.version"),
        ({k: v for k, v in good.items() if k != "service"}, "body.service"),
        ({k: v for k, v in good.items() if k != "address"}, "body.address"),
    ]
    for body, field in cases:
        problem(dp(plane, "POST", "/instances", json=body), 422, field)
    not_json = dp(
        plane, "POST", "/instances", content=b"{", headers={"Content-Type": "application/json"}
    )
    problem(not_json, 400, "body")
    huge = {**good, "labels": {f"k{n}": "v" * 60 for n in range(2000)}}
    refused = problem(dp(plane, "POST", "/instances", json=huge), 413)
    assert "65536 bytes" in refused["detail"]

    instance = register(plane, "strict", "10.8.0.1")
    problem(dp(plane, "PUT", f"/instances/{instance}", json={"ready": 1}), 422, "body.ready")
    problem(dp(plane, "PUT", f"/instances/{instance}", json={}), 422, "body.ready")
    extra = {"ready": True, "ttl": 60}
    problem(dp(plane, "PUT", f"/instances/{instance}", json=extra), 422, "body.ttl")
    problem(dp(plane, "PUT", "/instances/not%20an%20id", json={"ready": True}), 422)
    bad_id = Stream(plane, instance="../x")
    problem(bad_id.response, 422, "query.instance")
    bad_id.close()
    assert listed(plane, "strict")[0]["id"] == instance  # what was refused left nothing
    assert dp(plane, "DELETE", f"/instances/{instance}").status_code == 204


def test_200_concurrent_registrations_all_land_exactly_once(
    control_sqlite: ControlPlane,
) -> None:
    cp = control_sqlite
    watcher = Stream(cp)
    watcher.next()

    async def register_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(limits=limits, headers=headers, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{cp.url}/dp/v1/mesh/instances",
                        json={
                            "service": "crowd",
                            "address": f"10.9.{n // 250}.{n % 250}",
                            "port": 80,
                        },
                    )
                    for n in range(200)
                )
            )

    try:
        responses = asyncio.run(register_all())
        assert [r.status_code for r in responses] == [201] * 200
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 200
        watcher.until(lambda v: len(v.get("crowd", [])) == 200)
        assert watcher.ids("crowd") == ids
        assert len(watcher.view["crowd"]) == 200  # each once
        registered = listed(cp, "crowd")
        assert sorted(i["id"] for i in registered) == sorted(ids)
        assert len({(i["address"], i["port"]) for i in registered}) == 200
    finally:
        watcher.close()


def test_a_stopping_control_plane_ends_its_streams_at_once(control_sqlite: ControlPlane) -> None:
    watcher = Stream(control_sqlite)
    try:
        watcher.next()
        started = time.monotonic()
        control_sqlite.stop()
        # Not the 5 s uvicorn gives open connections to finish by themselves.
        assert time.monotonic() - started < 3.0
        assert watcher.items.get(timeout=1) is None  # the stream ended
    finally:
        watcher.close()


# The registry's stream mechanics, in process.


def _settings(**changes: Any) -> RegistrySettings:
    return RegistrySettings(**{"coalesce": 0.0, **changes})


def test_an_idle_stream_is_sent_a_ping_comment() -> None:
    async def run() -> list[bytes]:
        registry = Registry(_settings(ping=0.05), ["production"])
        sub = registry.subscribe("t", "production", None, None)
        events = registry.events(sub)
        chunks = [await anext(events) for _ in range(3)]
        registry.unsubscribe(sub)
        return chunks

    first, second, third = asyncio.run(run())
    assert first.startswith(b"retry: 1000\nevent: snapshot\n")
    assert second == third == b": ping\n\n"


def test_a_stream_that_falls_behind_is_sent_a_snapshot_not_a_backlog() -> None:
    async def run() -> tuple[bytes, bytes | None, bytes]:
        registry = Registry(_settings(backlog=3), ["production"])
        sub = registry.subscribe("t", "production", None, None)
        registry.take(sub)
        for n in range(3):
            registry.register(
                "t", "production", f"s{n}", Instance(address="10.0.0.1", port=1), True
            )
            await asyncio.sleep(0)
        merged = registry.take(sub)
        for n in range(4):
            registry.register(
                "t", "production", f"s{n}", Instance(address="10.0.0.2", port=1), True
            )
            await asyncio.sleep(0)
        assert len(sub.pending) == 0 and sub.resync
        behind = registry.take(sub)
        return merged or b"", registry.take(sub), behind or b""

    merged, nothing, behind = asyncio.run(run())
    assert merged.startswith(b"event: update\n")
    assert set(json.loads(merged.split(b"data: ")[1].split(b"\n")[0])["services"]) == {
        "s0",
        "s1",
        "s2",
    }
    assert nothing is None
    assert behind.startswith(b"event: snapshot\n")


def test_a_resume_from_a_version_no_longer_remembered_gets_a_snapshot() -> None:
    async def run() -> tuple[str, str]:
        registry = Registry(_settings(history=2), ["production"])
        start = registry.subscribe("t", "production", None, None)
        registry.take(start)
        version = registry._env("production").version
        for n in range(3):
            registry.register(
                "t", "production", f"s{n}", Instance(address="10.0.0.1", port=1), True
            )
            await asyncio.sleep(0)
        late = registry.subscribe("t", "production", str(version), None)
        recent = registry.subscribe("t", "production", str(version + 1), None)
        return (registry.take(late) or b"").decode(), (registry.take(recent) or b"").decode()

    late, recent = asyncio.run(run())
    assert "event: snapshot" in late
    assert "event: update" in recent and '"s0"' not in recent and '"s2"' in recent


def test_an_instance_whose_sidecar_speaks_mutual_tls_says_so_on_the_stream(
    plane: ControlPlane,
) -> None:
    watcher = Stream(plane)
    try:
        watcher.next()
        secure = register(plane, "ledger-m", "10.9.0.1", mtls=True)
        plain = register(plane, "ledger-m", "10.9.0.2")
        watcher.until(lambda v: len(v.get("ledger-m", [])) == 2)
        # Only those that speak it carry the field: an older sidecar reads the rest as before.
        assert watcher.view["ledger-m"] == [
            {"id": secure, "address": "10.9.0.1", "port": 8080, "version": "", "zone": "",
             "labels": {}, "weight": 1, "mtls": True},
            {"id": plain, "address": "10.9.0.2", "port": 8080, "version": "", "zone": "",
             "labels": {}, "weight": 1},
        ]  # fmt: skip
        assert {i["address"]: i["mtls"] for i in listed(plane, "ledger-m")} == {
            "10.9.0.1": True,
            "10.9.0.2": False,
        }
        bad = dp(plane, "POST", "/instances", json={"service": "ledger-m", "address": "10.9.0.3",
                                                      "port": 8080, "mtls": "yes"})  # fmt: skip
        assert bad.status_code == 422 and "mtls" in bad.text
        for instance in (secure, plain):
            assert dp(plane, "DELETE", f"/instances/{instance}").status_code == 204
    finally:
        watcher.close()
