"""Reloading a running context's routes file when it changes.

The new file is checked whole (parsed and compiled in a scratch context) before anything
running is touched: a file that fails is refused and the running routes are kept. Then
only what changed moves: routes gone from the file or redefined are stopped, their
in-flight exchanges drained, the redefined and new ones are started; a route that fails
to start is reported (its status ``failed`` with the cause) and the others keep running.

Changed top-level settings (``http.listen``, the broker and database URLs) apply too:
the routes that read one are drained and restarted against the new value (a setting
no scheme claims restarts every route). A route reads a setting through its endpoints'
schemes and through the repositories it names, in a step (``repository: sql``) or in an
option of a URI (``file:in?idempotent_repository=sql``). A new HTTP address is bound
before any route moves to it; when it cannot be, the routes stay on the old one and the
error is reported.
Reloads run one at a time (the file watch and SIGHUP may ask at once): each one waits for
the one before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from meshgate.integration._context import IntegrationContext
from meshgate.integration._errors import DefinitionError, EndpointError
from meshgate.integration._model import ErrorHandler, Route
from meshgate.integration._yaml import load_routes
from meshgate.integration.components.http import HttpComponent

__all__ = ["ReloadResult", "RoutesReloader"]

log = logging.getLogger("meshgate.integration")


@dataclass
class ReloadResult:
    """What a reload did; ``refused`` holds the new file's errors when it was not applied,
    ``settings`` the settings it changed, ``kept`` those it could not (setting: why)."""

    stopped: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


#: The settings that the endpoints of a scheme, or a repository of that name, read.
_SETTINGS_OF = {
    "http": ("http_listen",),
    "amqp": ("amqp_url",),
    "nats": ("nats_url",),
    "mqtt": ("mqtt_url",),
    "redis": ("redis_url",),
    "kafka": ("kafka_url",),
    "sql": ("database_url", "sql_statements"),
}
_CLAIMED = {key for keys in _SETTINGS_OF.values() for key in keys}
#: The settings a repository named in a URI's option reads.
_REPOSITORY_SETTINGS = {"sql": ("database_url",), "redis": ("redis_url",)}


def _texts(value: Any) -> Iterator[str]:
    """Every string of a route definition (URIs, repository names), nested steps included."""
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _texts(getattr(value, item.name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)


def _settings_read(route: Route, handler: ErrorHandler | None) -> set[str]:
    """The settings a route reads: through its endpoints, repositories, dead letter channel."""
    read: set[str] = set()
    for text in _texts((route, handler)):
        read |= _settings_of(text)
    return read


def _settings_of(text: str) -> set[str]:
    """The settings an endpoint URI (or a repository name) reads."""
    scheme = text.partition(":")[0] if ":" in text else text
    if scheme == "http" and text.startswith(("http://", "https://")):
        return set()  # a call to a service: no setting
    read = set(_SETTINGS_OF.get(scheme, ()))
    for value in _option_values(text):
        read.update(_REPOSITORY_SETTINGS.get(value, ()))
    return read


def _option_values(text: str) -> Iterator[str]:
    """The option values of a URI (``idempotent_repository=sql``): repositories named there."""
    if ":" not in text or "?" not in text:
        return
    for option in text.partition("?")[2].split("&"):
        name, equals, value = option.partition("=")
        if equals:
            yield unquote_plus(value).strip()


def _effective(route: Route, default: ErrorHandler | None) -> tuple[Route, ErrorHandler | None]:
    """What a route runs as: its definition and the error handler it gets."""
    return route, route.error_handler or default


class RoutesReloader:
    """Applies the changes of ``file`` to ``context``; ``watch`` does so when its mtime moves."""

    def __init__(
        self,
        context: IntegrationContext,
        file: str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        grace: float = 10.0,
    ) -> None:
        self.context = context
        self.file = Path(file)
        # Settings given on the command line win over the file's, as at start.
        self.overrides = dict(overrides or {})
        self.grace = grace
        self._seen = self._stamp()
        self._lock = asyncio.Lock()
        #: The last reload's result and when it ran (epoch seconds); None before the first.
        self.last: ReloadResult | None = None
        self.last_at: float | None = None

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.file.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the file's modification time or size changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            stamp = self._stamp()
            if stamp is not None and stamp != self._seen:
                self._seen = stamp
                try:
                    await self.reload()
                except Exception:
                    # The watch goes on: the next change of the file may fix it.
                    log.exception("%s: reload failed", self.file)

    async def reload(self) -> ReloadResult:
        """Applies the file; waits for a reload already running (one at a time)."""
        async with self._lock:
            result = await self._reload()
            self.last, self.last_at = result, time.time()
            return result

    def describe(self) -> dict[str, Any]:
        """The last reload, for the admin API: when, and what it did or refused."""
        doc: dict[str, Any] = {"file": str(self.file), "last": None}
        if self.last is not None:
            doc["last"] = {"at": self.last_at, **dataclasses.asdict(self.last)}
        return doc

    async def _reload(self) -> ReloadResult:
        context, result = self.context, ReloadResult()
        if context.stopping:
            result.refused = ["the runtime is stopping: nothing reloaded"]
            return result
        try:
            scratch = IntegrationContext(settings=self.overrides)
            loaded = load_routes(self.file, context=scratch)
            # Compiled as they will run: with the file's settings (repositories read them).
            settings = scratch.settings = {**loaded.settings, **self.overrides}
            scratch.error_handler = loaded.error_handler
            scratch.add_routes(loaded.routes)
        except DefinitionError as exc:
            result.refused = list(exc.errors)
            log.error(
                "%s: refused, the running routes are kept: %s", self.file, "; ".join(exc.errors)
            )
            return result
        wanted = {r.id: _effective(r, loaded.error_handler) for r in loaded.routes}
        if settings.get("http_listen") != context.settings.get("http_listen"):
            serves_http = any("http_listen" in _settings_read(*w) for w in wanted.values())
            error = await self._bind(scratch) if serves_http else None
            if error is not None:
                result.kept["http.listen"] = error
                settings.pop("http_listen", None)
                if "http_listen" in context.settings:
                    settings["http_listen"] = context.settings["http_listen"]
                log.error(
                    "%s: http.listen not changed, the routes stay where they are: %s",
                    self.file,
                    error,
                )
        changed = {
            key
            for key in settings.keys() | context.settings.keys()
            if settings.get(key) != context.settings.get(key)
        }
        result.settings = sorted(changed)
        running = {r.id: _effective(r, context.error_handler) for r in context.routes}

        def moves(rid: str) -> bool:
            """Redefined, gone, or reads a changed setting (any setting no scheme claims)."""
            if wanted.get(rid) != running[rid]:
                return True
            return bool(changed - _CLAIMED or changed & _settings_read(*running[rid]))

        result.stopped = [rid for rid in running if moves(rid)]
        added = [
            route
            for rid, (route, _) in wanted.items()
            if rid not in running or rid in result.stopped
        ]
        # Stopped under the settings they started with (an HTTP route leaves its listener).
        await asyncio.gather(*(context.remove_route(rid, self.grace) for rid in result.stopped))
        context.settings = settings
        if changed:
            # Producers made at run time (recipient lists, routing slips) are made anew.
            unclaimed = bool(changed - _CLAIMED)
            context.renew_dynamic_producers(
                lambda uri: unclaimed or bool(changed & _settings_of(uri)), self.grace
            )
        context.error_handler = loaded.error_handler
        context.add_routes(added)
        for route in added:
            if not route.auto_start:
                continue
            try:
                await context.start_route(route.id)
            except Exception as exc:
                result.failed[route.id] = f"{type(exc).__name__}: {exc}"
                log.error("route %s failed to start: %s", route.id, exc)
            else:
                result.started.append(route.id)
        log.info(
            "%s reloaded: %d route(s) stopped, %d started, %d failed, %d unchanged%s",
            self.file,
            len(result.stopped),
            len(result.started),
            len(result.failed),
            len(wanted) - len(added),
            f"; settings changed: {', '.join(result.settings)}" if result.settings else "",
        )
        return result

    async def _bind(self, scratch: IntegrationContext) -> str | None:
        """Opens the HTTP listener of the new settings (``scratch``'s) in the running HTTP
        component, before any route moves there; the error when it cannot."""
        http = self.context.components.get("http")
        if not isinstance(http, HttpComponent):
            return None
        try:
            await http.listener(scratch).open()
        except EndpointError as exc:
            return str(exc)
        return None
