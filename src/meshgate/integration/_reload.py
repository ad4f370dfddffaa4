"""Reloading a running context's routes file when it changes.

The new file is checked whole (parsed and compiled in a scratch context) before anything
running is touched: a file that fails is refused and the running routes are kept. Then
only what changed moves: routes gone from the file or redefined are stopped, their
in-flight exchanges drained, the redefined and new ones are started; a route that fails
to start is reported (its status ``failed`` with the cause) and the others keep running.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshgate.integration._context import IntegrationContext
from meshgate.integration._errors import DefinitionError
from meshgate.integration._model import ErrorHandler, Route
from meshgate.integration._yaml import load_routes

__all__ = ["ReloadResult", "RoutesReloader"]

log = logging.getLogger("meshgate.integration")


@dataclass
class ReloadResult:
    """What a reload did; ``refused`` holds the new file's errors when it was not applied."""

    stopped: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


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
        context, result = self.context, ReloadResult()
        try:
            scratch = IntegrationContext(settings=self.overrides)
            loaded = load_routes(self.file, context=scratch)
            scratch.error_handler = loaded.error_handler
            scratch.add_routes(loaded.routes)
        except DefinitionError as exc:
            result.refused = list(exc.errors)
            log.error(
                "%s: refused, the running routes are kept: %s", self.file, "; ".join(exc.errors)
            )
            return result
        settings = {**loaded.settings, **self.overrides}
        if settings != context.settings:
            log.warning("%s: settings changed; they apply at the next start", self.file)
        running = {r.id: _effective(r, context.error_handler) for r in context.routes}
        wanted = {r.id: _effective(r, loaded.error_handler) for r in loaded.routes}
        result.stopped = [rid for rid in running if wanted.get(rid) != running[rid]]
        added = [route for rid, (route, _) in wanted.items() if running.get(rid) != wanted[rid]]
        await asyncio.gather(*(context.remove_route(rid, self.grace) for rid in result.stopped))
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
            "%s reloaded: %d route(s) stopped, %d started, %d failed, %d unchanged",
            self.file,
            len(result.stopped),
            len(result.started),
            len(result.failed),
            len(wanted) - len(added),
        )
        return result
