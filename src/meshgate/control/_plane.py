"""The control plane's process state: store, token cache, snapshot compiler and notifier.

Changes are compiled in the background, coalesced (a burst of a thousand API calls makes a
few snapshots, not a thousand); gateways waiting in a long poll are woken when a new
version of their environment is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from meshgate.control import _mesh, snapshots
from meshgate.control._auth import TokenCache, hash_token, new_token
from meshgate.control._ca import CaSettings, CertificateAuthority
from meshgate.control._db import Database
from meshgate.control._metrics import ControlMetrics
from meshgate.control._problems import Problem
from meshgate.control._registry import Registry, RegistrySettings
from meshgate.control.models import AdminToken, MeshSnapshot, Product, Snapshot

if TYPE_CHECKING:
    from meshgate.analytics.alerts import AlertSettings

__all__ = ["ControlPlane", "ControlSettings", "Service", "mesh_channel"]

log = logging.getLogger("meshgate.control")

_Compiled = TypeVar("_Compiled", Snapshot, MeshSnapshot)


@dataclass
class ControlSettings:
    database_url: str
    listen: str = "127.0.0.1:8090"
    admin_token: str | None = None
    compile_delay: float = 0.05
    max_wait: float = 60.0
    data_dir: Path | None = None
    # The gateways' policy configuration models by name (meshgate.policies.schemas()), given
    # by whoever starts the control plane: with them, a policy a gateway would refuse is
    # refused here; without them, policies are stored unchecked.
    policy_schemas: snapshots.PolicySchemas | None = None
    # The mesh's service registry: TTL, stream grace, caps (see RegistrySettings).
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    # Usage alerts' mail and retries; None: from the environment (MESHGATE_SMTP_URL, ...).
    alerts: AlertSettings | None = None
    # The mesh CA: trust domain, certificate lifetime, its key or the operator's intermediate.
    ca: CaSettings = field(default_factory=CaSettings)


class Service(Protocol):
    """Background work beside the API (retention, alert delivery, billing schedule): started
    after the plane, stopped before it."""

    async def start(self, plane: ControlPlane) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class _Latest:
    version: int
    etag: str
    body: bytes


class ControlPlane:
    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.tokens = TokenCache()
        self.errors: dict[str, list[str]] = {env: [] for env in snapshots.ENVIRONMENTS}
        self._pending: set[str] = set()
        self._publish_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._versions: dict[str, asyncio.Event] = {}
        self._latest: dict[str, _Latest] = {}
        self._task: asyncio.Task[None] | None = None
        self._mesh_task: asyncio.Task[None] | None = None
        self.registry = Registry(settings.registry, snapshots.ENVIRONMENTS)
        self.metrics = ControlMetrics()
        self.metrics.plane = self
        self.bootstrap_token: str | None = None
        # Set on shutdown: long polls answer at once instead of holding the server open.
        self.closing = False
        # When each gateway was last recorded as seen (monotonic), to write that rarely.
        self.dataplane_seen: dict[str, float] = {}
        # Called with each usage batch stored (analytics.ingest.Ingested), after its commit.
        self.usage_listeners: list[Callable[[Any], None]] = []
        self.services: list[Service] = []
        self.ca = CertificateAuthority(self.db, settings.ca, settings.data_dir)

    # Start and stop

    def prepare(self) -> None:
        """Migrate the store, make sure an admin token exists, publish every environment."""
        self.db.migrate()
        self.bootstrap_token = self._bootstrap_token()
        self.ca.prepare()
        for env in snapshots.ENVIRONMENTS:
            self.publish(env, "start")
            with self.db.writer() as session, session.begin():
                _mesh.publish(session, env, "start")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        channels = [*snapshots.ENVIRONMENTS, *map(mesh_channel, snapshots.ENVIRONMENTS)]
        self._versions = {channel: asyncio.Event() for channel in channels}
        self._task = self._loop.create_task(self._compile_forever())
        await self._follow_mesh()
        self._mesh_task = self._loop.create_task(self._follow_mesh_forever())
        for service in self.services:
            await service.start(self)

    async def stop(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", type(service).__name__)
        self.registry.close()
        for task in (self._task, self._mesh_task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        # Whatever was pending is compiled before exit, so that no change waits for a restart.
        for env in sorted(self._pending):
            await asyncio.to_thread(self.publish, env, "change")
        self.db.dispose()

    def _bootstrap_token(self) -> str | None:
        """The token given in the settings is registered; without one and with no token in
        the store, a new one is made and returned. Until its first use it is kept (0600) in
        the data directory and returned on every start, so a start that fails, or output
        that is lost, does not lose the only way in."""
        wanted = self.settings.admin_token
        kept = self.settings.data_dir / "bootstrap-token" if self.settings.data_dir else None
        with self.db.writer() as session, session.begin():
            if wanted is not None:
                digest = hash_token(wanted)
                exists = session.scalar(select(AdminToken).where(AdminToken.token_hash == digest))
                if exists is None:
                    name = "bootstrap"
                    if session.scalar(select(AdminToken).where(AdminToken.name == name)):
                        name = f"bootstrap-{digest[:8]}"
                    session.add(
                        AdminToken(
                            name=name, token_hash=digest, scopes=["read", "write", "dataplane"]
                        )
                    )
                return wanted
            if session.scalar(select(AdminToken.id).limit(1)) is not None:
                return _unused(session, kept)
            token = new_token()
            session.add(
                AdminToken(
                    name="bootstrap",
                    token_hash=hash_token(token),
                    scopes=["read", "write", "dataplane"],
                )
            )
            if kept is not None:
                _keep(kept, token)
            return token

    # Changes

    def stage(self, session: Session, product_id: int) -> None:
        """Restage a product's configuration inside the change's transaction."""
        product = session.get(Product, product_id)
        if product is None:
            return
        try:
            snapshots.stage_product(session, product, self.settings.policy_schemas)
        except snapshots.StagingError as exc:
            errors = [
                # The product's own fields are the request's; the rest are its parts'.
                {"field": _field(path), "message": message}
                for path, message in exc.problems
            ]
            raise Problem(
                422, f"a gateway could not run this product: {exc}", errors=errors
            ) from None

    def changed(self, scope: str) -> None:
        """After a commit: schedule a compile of the environments the change reaches."""
        envs = {"staging"} if scope == "config" else set(snapshots.ENVIRONMENTS)
        self._pending |= envs
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _compile_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.settings.compile_delay)
            envs, self._pending = self._pending, set()
            for env in sorted(envs):
                try:
                    await asyncio.to_thread(self.publish, env, "change")
                except Exception:
                    log.exception("compiling %s failed; will retry on the next change", env)
                    self._pending.add(env)

    def publish(self, env: str, reason: str) -> Snapshot | None:
        """Compile ``env`` now and store a new version if it changed (thread-safe)."""
        started = time.perf_counter()
        with self._publish_lock, self.db.writer() as session, session.begin():
            compiled = snapshots.compile_environment(session, env)
            snapshot = snapshots.publish(session, env, reason, compiled)
        self.metrics.compile_seconds.labels(env).observe(time.perf_counter() - started)
        self.errors[env] = compiled.errors
        for error in compiled.errors:
            log.warning("%s: %s", env, error)
        if snapshot is not None:
            log.info(
                "%s snapshot version %d (%d bytes): %s",
                env,
                snapshot.version,
                snapshot.size,
                reason,
            )
            self._remember(env, snapshot)
            self.metrics.snapshot_bytes.labels(env).set(snapshot.size)
            self.metrics.snapshot_version.labels(env).set(snapshot.version)
        return snapshot

    def mesh_published(self, snapshot: MeshSnapshot | None) -> None:
        """After the commit of a new mesh version: wake the sidecars waiting for it, and
        give the registry its static instances."""
        if snapshot is None:
            return
        self._remember(mesh_channel(snapshot.env), snapshot)
        services = json.loads(snapshot.document)["services"]
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self.registry.configure, snapshot.env, snapshot.version, services
            )

    async def _follow_mesh(self) -> None:
        """Give the registry each environment's newest mesh configuration, also when another
        replica published it."""
        for env in snapshots.ENVIRONMENTS:
            latest = await asyncio.to_thread(self.latest_mesh, env)
            if latest is not None and latest.version > self.registry.configured(env):
                services = json.loads(latest.body)["services"]
                self.registry.configure(env, latest.version, services)

    async def _follow_mesh_forever(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._follow_mesh()
            except Exception:
                log.exception("reading the mesh configuration failed; will retry")

    # Distribution

    def _remember(self, channel: str, snapshot: Snapshot | MeshSnapshot) -> None:
        latest = _Latest(snapshot.version, _etag(channel, snapshot), snapshot.document.encode())
        current = self._latest.get(channel)
        if current is None or current.version < latest.version:
            self._latest[channel] = latest
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._notify, channel)

    def _notify(self, channel: str) -> None:
        event = self._versions.get(channel)
        if event is not None:
            event.set()
        self._versions[channel] = asyncio.Event()

    def latest(self, env: str) -> _Latest | None:
        """The newest version of ``env``; read from the store, so other replicas' count."""
        return self._latest_of(Snapshot, env, env)

    def latest_mesh(self, env: str) -> _Latest | None:
        """The newest mesh configuration of ``env``, as :meth:`latest`."""
        return self._latest_of(MeshSnapshot, mesh_channel(env), env)

    def _latest_of(self, model: type[_Compiled], channel: str, env: str) -> _Latest | None:
        with self.db.session() as session:
            row = session.execute(
                select(model.version)
                .where(model.env == env)
                .order_by(model.version.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            cached = self._latest.get(channel)
            if cached is not None and cached.version == row.version:
                return cached
            snapshot = session.scalars(
                select(model).where(model.env == env, model.version == row.version)
            ).one()
        latest = _Latest(snapshot.version, _etag(channel, snapshot), snapshot.document.encode())
        self._latest[channel] = latest
        return latest

    async def wait_for_change(self, channel: str, timeout: float) -> None:
        """Until ``channel`` (an environment, or :func:`mesh_channel` of one) has a new
        version, or ``timeout`` seconds."""
        event = self._versions.get(channel)
        if self.closing:
            return
        if event is None:
            await asyncio.sleep(timeout)
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass

    def end_long_polls(self) -> None:
        """Shutting down: every long poll answers now (304), none is held open."""
        self.closing = True
        for event in self._versions.values():
            event.set()

    def status(self) -> dict[str, Any]:
        return {
            "pending": sorted(self._pending),
            "errors": self.errors,
            "mesh": self.registry.counts(),
        }


def _keep(path: Path, token: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
    except OSError as exc:
        log.warning("cannot keep the admin token in %s: %s", path, exc)


def _unused(session: Session, path: Path | None) -> str | None:
    """The kept bootstrap token while it has not been used; the file goes once it has."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    row = session.scalar(select(AdminToken).where(AdminToken.token_hash == hash_token(token)))
    if row is not None and row.last_used_at is None:
        return token
    path.unlink(missing_ok=True)
    return None


def mesh_channel(env: str) -> str:
    """What waiters for the mesh configuration of ``env`` wait on."""
    return f"mesh:{env}"


def _field(path: str) -> str:
    """A problem's field: ``body.`` for the product's own settings, else its part's path."""
    head = path.partition(".")[0].partition("[")[0]
    return path if head in _PARTS else f"body.{path}" if path else "body"


_PARTS = ("backends", "metrics", "mapping_rules")


def _etag(channel: str, snapshot: Snapshot | MeshSnapshot) -> str:
    # "production-3-…" for the products, "mesh-production-3-…" for the mesh.
    return f'"{channel.replace(":", "-")}-{snapshot.version}-{snapshot.digest[:12]}"'
