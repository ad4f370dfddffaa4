"""The mesh's service registry: where each service's instances are, and the endpoint streams
that carry every change of it to the sidecars.

Soft state, held in this process's memory as a Eureka server or a Consul agent holds it: a
sidecar registers its instance and heartbeats it, and after a control-plane restart its
heartbeat answers 404 and it registers again. A registration ends when its heartbeats stop
(``ttl``), when it is removed, when the same address registers again, or, when an endpoint
stream was opened for it, ``grace`` seconds after that stream's connection closed (a sidecar
killed with SIGKILL: the kernel closes its socket). Static instances come from the
environment's stored mesh configuration. Control-plane replicas do not share registrations:
the sidecars of an environment use one replica.

Everything here runs on the event loop: a change is made without an await, so changes never
interleave; other threads reach it through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from meshgate.config.mesh import Instance
from meshgate.control._problems import Problem

__all__ = ["Registration", "Registry", "RegistrySettings", "Subscription"]

log = logging.getLogger("meshgate.control.registry")

# What an instance is on the wire: its registration id and where and what it is.
WIRE_FIELDS = ("address", "port", "version", "zone", "labels", "weight", "mtls")
# Sent with a stream's first event: an EventSource client reconnects after this long.
_RETRY = b"retry: 1000\n"


@dataclass(frozen=True)
class RegistrySettings:
    ttl: float = 10.0  # seconds a registration lives after its last heartbeat
    grace: float = 1.0  # seconds a stream-bound registration outlives its stream
    max_instances: int = 20_000
    max_instances_per_token: int = 5_000
    max_streams: int = 10_000
    max_streams_per_token: int = 5_000
    ping: float = 5.0  # seconds between ": ping" comments on an idle stream
    # Updates a stream may fall behind by; beyond, it is sent a fresh snapshot instead.
    backlog: int = 64
    # Changes remembered per environment, for a stream resumed with Last-Event-ID.
    history: int = 4096
    # Changes this close together are pushed as one update (a re-registration storm after a
    # restart recomputes each service's list once per batch, not once per instance).
    coalesce: float = 0.01


@dataclass(eq=False)
class Registration:
    id: str
    env: str
    service: str
    owner: str
    wire: dict[str, Any]
    ready: bool
    registered_at: datetime
    heartbeat_at: datetime
    expires: float  # loop time
    streams: int = 0
    timer: asyncio.TimerHandle | None = None
    grace: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class Update:
    """One batch of changes: each changed service's complete new list."""

    version: int
    services: Mapping[str, tuple[dict[str, Any], ...]]

    @cached_property
    def encoded(self) -> bytes:
        return _event("update", self.version, self.services)


@dataclass(eq=False)
class Subscription:
    """An open endpoint stream: what it still has to send."""

    env: str
    owner: str
    registration: Registration | None
    resync: bool = True  # send a snapshot next
    pending: list[Update] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    first: bool = True
    closed: bool = False


@dataclass(eq=False)
class _Environment:
    version: int
    floor: int  # the newest version whose changes are no longer in history
    history: deque[tuple[int, frozenset[str]]]
    # Services of the stored mesh configuration and their static instances.
    static: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)
    config_version: int = 0
    registered: dict[str, dict[str, Registration]] = field(default_factory=dict)
    # Each service's list as the streams were last sent it.
    lists: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    subscriptions: set[Subscription] = field(default_factory=set)
    encoded: tuple[int, bytes] | None = None  # the snapshot event of a version


def _event(kind: str, version: int, services: Mapping[str, Iterable[dict[str, Any]]]) -> bytes:
    data = json.dumps(
        {"version": version, "services": {name: list(items) for name, items in services.items()}},
        separators=(",", ":"),
    )
    return format_sse_event(data_str=data, event=kind, id=str(version))


def _static_wire(instance: dict[str, Any]) -> dict[str, Any]:
    item = Instance.model_validate(instance).model_dump(mode="json", exclude={"mtls"})
    return {"id": f"static:{item['address']}:{item['port']}", **item}


class Registry:
    def __init__(self, settings: RegistrySettings, envs: Iterable[str]) -> None:
        self.settings = settings
        # Versions start at this process's start time in microseconds, so that a version
        # a client kept from before a restart is never taken for one of this process.
        base = time.time_ns() // 1000
        self._envs = {env: _Environment(base, base, deque(maxlen=settings.history)) for env in envs}
        self._by_id: dict[str, Registration] = {}
        self._by_address: dict[tuple[str, str, str, int], Registration] = {}
        self._owners: Counter[str] = Counter()
        self._stream_owners: Counter[str] = Counter()
        self._streams = 0
        self._flush: asyncio.Handle | None = None
        self._flushed = 0.0

    def _env(self, env: str) -> _Environment:
        return self._envs[env]

    # Registrations

    def register(self, owner: str, env: str, service: str, instance: Instance, ready: bool) -> str:
        """Register an instance; the same address and port of the service registered again
        replaces the earlier registration (a new id: the old one answers 404 from now on)."""
        key = (env, service, instance.address, instance.port)
        old = self._by_address.get(key)
        if old is not None and old.owner != owner:
            raise Problem(
                409,
                f"{instance.address}:{instance.port} of service {service!r} is registered by "
                "another token: only that token replaces it, or it expires",
                field="body.address",
            )
        if old is None:
            if len(self._by_id) >= self.settings.max_instances:
                raise Problem(
                    429,
                    f"the registry holds {len(self._by_id)} instances, its limit: none is "
                    "registered until others leave",
                    headers={"Retry-After": str(max(1, round(self.settings.ttl)))},
                )
            if self._owners[owner] >= self.settings.max_instances_per_token:
                raise Problem(
                    429,
                    f"this token has {self._owners[owner]} registered instances, the most one "
                    "token may have: remove some, or give other sidecars another token",
                    headers={"Retry-After": str(max(1, round(self.settings.ttl)))},
                )
        else:
            self._remove(old)
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        reg_id = secrets.token_urlsafe(18)
        wire = {"id": reg_id, **instance.model_dump(mode="json", include=set(WIRE_FIELDS))}
        if not wire["mtls"]:
            # Only instances whose sidecar speaks mutual TLS carry the field: a sidecar that
            # predates it reads the others as before.
            del wire["mtls"]
        reg = Registration(
            id=reg_id,
            env=env,
            service=service,
            owner=owner,
            wire=wire,
            ready=ready,
            registered_at=now,
            heartbeat_at=now,
            expires=loop.time() + self.settings.ttl,
        )
        reg.timer = loop.call_at(reg.expires, self._expiry, reg)
        self._by_id[reg_id] = reg
        self._by_address[key] = reg
        self._owners[owner] += 1
        self._env(env).registered.setdefault(service, {})[reg_id] = reg
        self._mark(env, service)
        return reg_id

    def _own(self, owner: str, reg_id: str) -> Registration:
        reg = self._by_id.get(reg_id)
        if reg is None:
            raise Problem(
                404, f"instance {reg_id} is not registered (expired or removed): register again"
            )
        if reg.owner != owner:
            raise Problem(403, f"instance {reg_id} was registered by another token")
        return reg

    def heartbeat(self, owner: str, reg_id: str, ready: bool) -> None:
        reg = self._own(owner, reg_id)
        # The expiry timer finds the later deadline when it fires: no timer per heartbeat.
        reg.expires = asyncio.get_running_loop().time() + self.settings.ttl
        reg.heartbeat_at = datetime.now(UTC)
        if reg.ready != ready:
            reg.ready = ready
            self._mark(reg.env, reg.service)

    def deregister(self, owner: str, reg_id: str) -> None:
        self._remove(self._own(owner, reg_id))

    def _current(self, reg: Registration) -> bool:
        return self._by_id.get(reg.id) is reg

    def _expiry(self, reg: Registration) -> None:
        if not self._current(reg):
            return
        loop = asyncio.get_running_loop()
        if loop.time() < reg.expires:
            reg.timer = loop.call_at(reg.expires, self._expiry, reg)
            return
        log.info("instance %s of %s (%s) expired", reg.id, reg.service, reg.env)
        self._remove(reg)

    def _grace_over(self, reg: Registration) -> None:
        if self._current(reg) and reg.streams == 0:
            log.info("instance %s of %s (%s): its stream closed", reg.id, reg.service, reg.env)
            self._remove(reg)

    def _remove(self, reg: Registration) -> None:
        for handle in (reg.timer, reg.grace):
            if handle is not None:
                handle.cancel()
        del self._by_id[reg.id]
        del self._by_address[(reg.env, reg.service, reg.wire["address"], reg.wire["port"])]
        self._owners[reg.owner] -= 1
        if not self._owners[reg.owner]:
            del self._owners[reg.owner]
        env = self._env(reg.env)
        peers = env.registered[reg.service]
        del peers[reg.id]
        if not peers:
            del env.registered[reg.service]
        self._mark(reg.env, reg.service)

    # The stored mesh configuration

    def configure(self, env: str, version: int, services: list[dict[str, Any]]) -> None:
        """Take the environment's mesh configuration of ``version``: its services and their
        static instances (an older version than the one held is ignored)."""
        state = self._env(env)
        if version <= state.config_version:
            return
        state.config_version = version
        static = {
            s["name"]: tuple(_static_wire(i) for i in s.get("instances", ())) for s in services
        }
        for name in set(static) | set(state.static):
            if static.get(name) != state.static.get(name) or name not in state.static:
                self._mark(env, name)
        state.static = static

    def configured(self, env: str) -> int:
        """The version of the environment's mesh configuration taken last (0: none)."""
        return self._env(env).config_version

    # Streams

    def subscribe(
        self, owner: str, env: str, last_event_id: str | None, instance: str | None
    ) -> Subscription:
        """A new endpoint stream: a snapshot first, or only what changed since
        ``last_event_id`` when that version's changes are all still known."""
        if self._streams >= self.settings.max_streams:
            raise Problem(
                429,
                f"this control plane serves {self._streams} endpoint streams, its limit",
                headers={"Retry-After": "5"},
            )
        if self._stream_owners[owner] >= self.settings.max_streams_per_token:
            raise Problem(
                429,
                f"this token has {self._stream_owners[owner]} endpoint streams open, the most "
                "one token may have",
                headers={"Retry-After": "5"},
            )
        reg = None
        if instance is not None:
            reg = self._by_id.get(instance)
            if reg is None:
                raise Problem(
                    404,
                    f"instance {instance} is not registered (expired or removed): register again",
                    field="query.instance",
                )
            if reg.owner != owner:
                raise Problem(
                    403,
                    f"instance {instance} was registered by another token",
                    field="query.instance",
                )
            if reg.env != env:
                raise Problem(
                    422,
                    f"instance {instance} is registered in {reg.env}, not {env}",
                    field="query.env",
                )
        state = self._env(env)
        sub = Subscription(env, owner, reg)
        since = _version_of(last_event_id)
        if since is not None and state.floor <= since <= state.version:
            sub.resync = False
            changed = {
                name for version, names in state.history if version > since for name in names
            }
            if changed:
                sub.pending.append(
                    Update(
                        state.version, {name: state.lists.get(name, ()) for name in sorted(changed)}
                    )
                )
        if reg is not None:
            reg.streams += 1
            if reg.grace is not None:
                reg.grace.cancel()
                reg.grace = None
        state.subscriptions.add(sub)
        self._streams += 1
        self._stream_owners[owner] += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.closed:
            return
        sub.closed = True
        self._env(sub.env).subscriptions.discard(sub)
        self._streams -= 1
        self._stream_owners[sub.owner] -= 1
        if not self._stream_owners[sub.owner]:
            del self._stream_owners[sub.owner]
        reg = sub.registration
        if reg is not None and self._current(reg):
            reg.streams -= 1
            if reg.streams == 0:
                loop = asyncio.get_running_loop()
                reg.grace = loop.call_later(self.settings.grace, self._grace_over, reg)

    def take(self, sub: Subscription) -> bytes | None:
        """What the stream sends next, if anything: a snapshot, or the updates it has not
        sent yet merged into one."""
        state = self._env(sub.env)
        if sub.resync:
            sub.resync = False
            sub.pending.clear()
            if state.encoded is None or state.encoded[0] != state.version:
                state.encoded = (state.version, _event("snapshot", state.version, state.lists))
            chunk = state.encoded[1]
        elif not sub.pending:
            return None
        elif len(sub.pending) == 1:
            chunk = sub.pending.pop().encoded
        else:
            merged: dict[str, tuple[dict[str, Any], ...]] = {}
            for update in sub.pending:
                merged.update(update.services)
            chunk = Update(sub.pending[-1].version, merged).encoded
            sub.pending.clear()
        if sub.first:
            sub.first = False
            chunk = _RETRY + chunk
        return chunk

    async def events(self, sub: Subscription) -> AsyncIterator[bytes]:
        """The stream's bytes: events as they happen, a ``: ping`` comment when idle."""
        while not sub.closed:
            chunk = self.take(sub)
            if chunk is not None:
                yield chunk
                continue
            try:
                await asyncio.wait_for(sub.wake.wait(), self.settings.ping)
            except TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            sub.wake.clear()

    def close(self) -> None:
        """End every stream (the process is stopping)."""
        for state in self._envs.values():
            for sub in list(state.subscriptions):
                sub.closed = True
                sub.wake.set()
        for reg in self._by_id.values():
            for handle in (reg.timer, reg.grace):
                if handle is not None:
                    handle.cancel()
        if self._flush is not None:
            self._flush.cancel()

    # Pushing changes

    def _mark(self, env: str, service: str) -> None:
        self._env(env).dirty.add(service)
        if self._flush is not None:
            return
        loop = asyncio.get_running_loop()
        at = self._flushed + self.settings.coalesce
        if loop.time() >= at:
            self._flush = loop.call_soon(self._push)
        else:
            self._flush = loop.call_at(at, self._push)

    def _list(self, state: _Environment, service: str) -> tuple[dict[str, Any], ...]:
        """The service's endpoints: its static instances, bar those a sidecar registered
        (it knows their readiness), and its ready registered instances."""
        registered = state.registered.get(service, {})
        taken = {(r.wire["address"], r.wire["port"]) for r in registered.values()}
        static = [
            w for w in state.static.get(service, ()) if (w["address"], w["port"]) not in taken
        ]
        return (*static, *(r.wire for r in registered.values() if r.ready))

    def _push(self) -> None:
        self._flush = None
        self._flushed = asyncio.get_running_loop().time()
        for state in self._envs.values():
            if not state.dirty:
                continue
            changed: dict[str, tuple[dict[str, Any], ...]] = {}
            for service in sorted(state.dirty):
                items = self._list(state, service)
                known = service in state.lists
                if known and state.lists[service] == items:
                    continue
                if not items and service not in state.static and service not in state.registered:
                    # Neither declared nor registered any more: the last update says so.
                    state.lists.pop(service, None)
                    if known:
                        changed[service] = items
                    continue
                state.lists[service] = items
                changed[service] = items
            state.dirty.clear()
            if not changed:
                continue
            state.version += 1
            if len(state.history) == state.history.maxlen:
                state.floor = state.history[0][0]
            state.history.append((state.version, frozenset(changed)))
            update = Update(state.version, changed)
            for sub in state.subscriptions:
                if sub.resync:
                    pass
                elif len(sub.pending) >= self.settings.backlog:
                    sub.pending.clear()
                    sub.resync = True
                else:
                    sub.pending.append(update)
                sub.wake.set()

    # The admin API's view

    def instances(self, env: str, service: str | None = None) -> list[dict[str, Any]]:
        state = self._env(env)
        now = asyncio.get_running_loop().time()
        out: list[dict[str, Any]] = []
        names = sorted(set(state.static) | set(state.registered))
        for name in names if service is None else [service]:
            for wire in state.static.get(name, ()):
                out.append({**wire, "service": name, "env": env, "ready": True, "source": "static"})
            for reg in state.registered.get(name, {}).values():
                out.append(
                    {
                        **reg.wire,
                        "service": name,
                        "env": env,
                        "ready": reg.ready,
                        "source": "registered",
                        "owner": reg.owner,
                        "registered_at": reg.registered_at,
                        "last_heartbeat": reg.heartbeat_at,
                        "expires_in": round(max(0.0, reg.expires - now), 3),
                        "streams": reg.streams,
                    }
                )
        return out

    def counts(self) -> dict[str, int]:
        return {"instances": len(self._by_id), "streams": self._streams}


def _version_of(last_event_id: str | None) -> int | None:
    if last_event_id is None or not re.fullmatch(r"[0-9]{1,20}", last_event_id.strip()):
        return None
    return int(last_event_id.strip())
