"""A sidecar and its control plane: registration, heartbeats, endpoints, configuration.

Three loops, all over the control plane's data-plane API with the sidecar's token:

- the instance is registered (``POST /dp/v1/mesh/instances``) and kept alive with
  heartbeats carrying the app's readiness; a 404 (the control plane restarted and lost its
  soft state, or the TTL passed) registers it again;
- the endpoint stream (``GET /dp/v1/mesh/endpoints``, server-sent events) delivers every
  service's instances, then each change as it happens; the open stream also tells the
  control plane this instance lives, so a sidecar killed outright leaves within a second;
- the mesh configuration is long-polled (``GET /dp/v1/mesh/config``, ETag); one that
  does not validate is refused and the last good one keeps serving.

And one report: every ``edge_interval`` seconds the calls this sidecar saw, as edges of the
service graph (``POST /dp/v1/mesh/edges``); what a failed report held goes with the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from meshgate.config.mesh import ConfigError, Instance, MeshConfig, SidecarSettings, validate_mesh
from meshgate.mesh._edges import EdgeCollector
from meshgate.proxy.client import HttpError, open_stream, request

__all__ = ["ControlPlaneLink"]

log = logging.getLogger("meshgate.mesh.control_plane")

CONFIG_MAX_BYTES = 64 * 2**20
LONG_POLL_SECONDS = 30
# The longest a single event may be (a snapshot of 10,000 instances fits well within).
EVENT_MAX_BYTES = 64 * 2**20


class ControlPlaneLink:
    """Keeps a sidecar registered, its endpoints and configuration current."""

    def __init__(
        self,
        url: str,
        token: str,
        env: str,
        settings: SidecarSettings,
        advertise: tuple[str, int],
        *,
        on_config: Callable[[MeshConfig], None],
        on_endpoints: Callable[[str, list[Instance]], None],
        edges: EdgeCollector | None = None,
        edge_interval: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.env = env
        self.settings = settings
        self.advertise = advertise
        self.on_config = on_config
        self.on_endpoints = on_endpoints
        self.edges = edges
        self.edge_interval = edge_interval
        self.instance_id: str | None = None
        self.ttl = 10.0
        self.ready = False
        self.config_version: str | None = None
        self.endpoints_version: int | None = None
        self.last_error: str | None = None
        self.last_contact: float | None = None
        self.config_applied = asyncio.Event()
        self.endpoints_seen = asyncio.Event()
        self._ready_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._known_services: set[str] = set()
        self._registered = asyncio.Event()
        # The open endpoint stream: closed when the instance registers anew, so that the
        # next one is bound to the new registration (its liveness rides on it).
        self._stream: Any = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._registration()),
            loop.create_task(self._endpoints()),
            loop.create_task(self._config()),
        ]
        if self.edges is not None:
            self._tasks.append(loop.create_task(self._report_edges()))

    def set_ready(self, ready: bool) -> None:
        """The app's readiness changed: tell the control plane now, not at the next beat."""
        if ready != self.ready:
            self.ready = ready
            self._ready_changed.set()

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "env": self.env,
            "instance": self.instance_id,
            "config_version": self.config_version,
            "endpoints_version": self.endpoints_version,
            "last_error": self.last_error,
            "last_contact": self.last_contact,
        }

    async def stop(self) -> None:
        """Leave the endpoint set at once (drain), then stop every loop."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.edges is not None:
            await self._send_edges(timeout=1.0)
        instance, self.instance_id = self.instance_id, None
        if instance is not None:
            try:
                await request(
                    "DELETE",
                    f"{self.url}/dp/v1/mesh/instances/{quote(instance)}",
                    headers=self.headers,
                    timeout=2.0,
                    max_body=65536,
                )
            except HttpError as exc:
                log.warning("could not deregister from the control plane: %s", exc)

    def _failed(self, what: str, exc: Exception | str) -> None:
        message = f"{what}: {exc}"
        if message != self.last_error:
            log.warning("control plane: %s", message)
        self.last_error = message

    def _contact(self) -> None:
        self.last_contact = time.time()

    async def _call(self, method: str, path: str, doc: dict[str, Any] | None) -> tuple[int, Any]:
        body = json.dumps(doc).encode() if doc is not None else b""
        headers = self.headers
        if doc is not None:
            headers = {**headers, "Content-Type": "application/json"}
        response = await request(
            method, self.url + path, headers=headers, body=body, timeout=5.0, max_body=1 << 20
        )
        self._contact()
        try:
            parsed = json.loads(response.body) if response.body else None
        except ValueError:
            parsed = None
        return response.status, parsed

    def _registration_doc(self) -> dict[str, Any]:
        s = self.settings
        address, port = self.advertise
        return {
            "env": self.env,
            "service": s.service,
            "address": address,
            "port": port,
            "version": s.version,
            "zone": s.zone,
            "labels": dict(s.labels),
            "weight": 1,
            "ready": self.ready,
        }

    async def _register(self) -> None:
        status, doc = await self._call("POST", "/dp/v1/mesh/instances", self._registration_doc())
        if status not in (200, 201) or not isinstance(doc, dict) or "id" not in doc:
            raise HttpError(f"registration refused: HTTP {status}: {_detail(doc)}")
        self.instance_id = str(doc["id"])
        self._registered.set()
        if self._stream is not None:
            self._stream.close()
        ttl = doc.get("ttl")
        if isinstance(ttl, int | float) and ttl > 0:
            self.ttl = float(ttl)
        log.info("registered as instance %s of %s", self.instance_id, self.settings.service)

    async def _registration(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self.instance_id is None:
                    await self._register()
                else:
                    self._ready_changed.clear()
                    status, doc = await self._call(
                        "PUT",
                        f"/dp/v1/mesh/instances/{quote(self.instance_id)}",
                        {"ready": self.ready},
                    )
                    if status == 404:
                        self.instance_id = None
                        continue
                    if status != 200:
                        raise HttpError(f"heartbeat refused: HTTP {status}: {_detail(doc)}")
                backoff = 0.5
                try:
                    await asyncio.wait_for(self._ready_changed.wait(), self.ttl / 3)
                except TimeoutError:
                    pass
            except HttpError as exc:
                self._failed("registration", exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)

    async def _endpoints(self) -> None:
        backoff = 0.2
        try:
            # The first stream is bound to the registration when it comes quickly.
            await asyncio.wait_for(self._registered.wait(), 2.0)
        except TimeoutError:
            pass
        while True:
            url = f"{self.url}/dp/v1/mesh/endpoints?env={quote(self.env)}"
            bound = self.instance_id
            if bound is not None:
                url += f"&instance={quote(bound)}"
            headers = self.headers
            if self.endpoints_version is not None:
                headers = {**headers, "Last-Event-ID": str(self.endpoints_version)}
            try:
                stream = self._stream = await open_stream(url, headers=headers, timeout=10.0)
                # The control plane pings every 5 s: three missed, and the stream is dead.
                stream.idle = 15.0
                try:
                    if stream.status != 200:
                        raise HttpError(f"endpoint stream refused: HTTP {stream.status}")
                    self._contact()
                    await self._follow(stream, bound)
                finally:
                    self._stream = None
                    stream.close()
                backoff = 0.2
            except (HttpError, OSError, ValueError) as exc:
                if bound != self.instance_id:
                    continue  # closed on purpose: registered anew, bind the next stream
                self._failed("endpoint stream", exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)

    async def _follow(self, stream: Any, bound: str | None) -> None:
        """Apply events until the stream ends, or until the instance it was opened for
        changes (registered again), so that the new one is bound to a stream too."""
        buffer = b""
        async for chunk in stream.chunks():
            buffer += chunk
            if len(buffer) > EVENT_MAX_BYTES:
                raise HttpError(f"an event larger than {EVENT_MAX_BYTES} bytes")
            while True:
                end = _event_end(buffer)
                if end is None:
                    break
                raw, buffer = buffer[: end[0]], buffer[end[1] :]
                self._event(raw)
            if self.instance_id != bound:
                return

    def _event(self, raw: bytes) -> None:
        kind = "message"
        data: list[str] = []
        event_id = None
        for line in raw.decode("utf-8", "replace").splitlines():
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
        if not data or kind not in ("snapshot", "update"):
            return
        try:
            doc = json.loads("\n".join(data))
            services = doc["services"]
            changed = {
                name: [Instance.model_validate(_instance(i)) for i in instances]
                for name, instances in services.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._failed("endpoint stream", f"an event that does not parse: {exc}")
            return
        if kind == "snapshot":
            for name in self._known_services - changed.keys():
                self.on_endpoints(name, [])
        for name, instances in changed.items():
            self.on_endpoints(name, instances)
        self._known_services |= changed.keys()
        version = doc.get("version", event_id)
        if isinstance(version, int):
            self.endpoints_version = version
        self.endpoints_seen.set()

    async def _send_edges(self, timeout: float = 5.0) -> None:
        assert self.edges is not None
        edges = self.edges.collect()
        if not edges:
            return
        body = json.dumps({"env": self.env, "edges": edges}).encode()
        try:
            response = await request(
                "POST",
                self.url + "/dp/v1/mesh/edges",
                headers={**self.headers, "Content-Type": "application/json"},
                body=body,
                timeout=timeout,
                max_body=65536,
            )
        except HttpError as exc:
            self._failed("edge report", exc)
            return
        self._contact()
        if response.status == 202:
            self.edges.acknowledged()
        elif 400 <= response.status < 500:
            # Refused as it is: sending it again would be refused again.
            self.edges.acknowledged()
            self._failed("edge report", f"HTTP {response.status}: {response.body[:300]!r}")
        else:
            self._failed("edge report", f"HTTP {response.status}")

    async def _report_edges(self) -> None:
        while True:
            await asyncio.sleep(self.edge_interval)
            await self._send_edges()

    async def _config(self) -> None:
        etag: str | None = None
        backoff = 0.5
        while True:
            headers = self.headers
            if etag is not None:
                headers = {**headers, "If-None-Match": etag}
            url = (
                f"{self.url}/dp/v1/mesh/config?env={quote(self.env)}"
                f"&wait={LONG_POLL_SECONDS if etag else 0}"
            )
            try:
                response = await request(
                    "GET",
                    url,
                    headers=headers,
                    timeout=LONG_POLL_SECONDS + 10,
                    max_body=CONFIG_MAX_BYTES,
                )
                self._contact()
                backoff = 0.5
            except HttpError as exc:
                self._failed("configuration", exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 10.0)
                continue
            if response.status == 304:
                continue
            if response.status != 200:
                self._failed("configuration", f"HTTP {response.status}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            etag = response.headers.get("etag")
            try:
                config = validate_mesh(json.loads(response.body))
            except (ValueError, ConfigError) as exc:
                self._failed("configuration refused", exc)
                continue
            self.on_config(config)
            self.config_version = config.version
            self.config_applied.set()


def _instance(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "id"}


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first complete event of ``buffer`` ends, and where the next begins."""
    best = None
    for sep in (b"\n\n", b"\r\n\r\n"):
        at = buffer.find(sep)
        if at != -1 and (best is None or at < best[0]):
            best = (at, at + len(sep))
    return best


def _detail(doc: Any) -> str:
    if isinstance(doc, dict):
        return str(doc.get("detail") or doc.get("title") or doc)
    return str(doc)
