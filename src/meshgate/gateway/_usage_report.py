"""Reports usage to the control plane: batches every interval, spooled, sent oldest first.

``POST {control plane}/dp/v1/usage`` with the data-plane headers of the snapshot sync and a
batch as JSON (``meshgate.config.usage``). 2xx acknowledges the batch (a batch sent again is
acknowledged as a duplicate, counted once); 401, 403, 408, 429, 5xx and no answer are
retried with exponential backoff capped at 30 s; any other 4xx refuses the batch for good
(logged, counted, deleted: it would never be accepted). On a graceful stop the last sums are
spooled and sent while the stop's grace lasts; what is left is sent at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from meshgate.gateway._usage import LocalTally, Tally, batch_bodies
from meshgate.gateway._usage_spool import Spool
from meshgate.proxy.client import HttpError, request

__all__ = ["LocalSource", "UsageReporter", "UsageSource", "batch_origin", "spool_directory"]

log = logging.getLogger("meshgate.gateway.usage")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
SEND_TIMEOUT = 15.0
_RETRIED = frozenset({401, 403, 408, 429})
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


def batch_origin(dataplane_id: str) -> str:
    """The start of this process's batch ids: its data-plane id (made safe for an id) and a
    UUID of this run, so that no two runs, nor two gateways, ever share an id."""
    return f"{_UNSAFE.sub('-', dataplane_id)[:64]}:{uuid.uuid4().hex}"


def spool_directory(cache_dir: Path, dataplane_id: str) -> Path:
    """Each data plane's own spool under the cache directory (workers share the latter)."""
    return Path(cache_dir) / "usage" / _UNSAFE.sub("-", dataplane_id)[:100]


class UsageSource(Protocol):
    """Where the batches come from: this process's sums, or Redis's."""

    on_drop: Callable[[int], None]  # batches dropped before they reached the spool

    async def collect(self, final: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
        """New batches (id, body, what to do once acknowledged); ``final``: the process is
        stopping, take everything."""
        ...

    async def acknowledged(self, after: dict[str, Any]) -> None:
        """A batch collected with ``after`` was acknowledged."""
        ...


class LocalSource:
    """The sums of a :class:`LocalTally`, swapped out at each collection."""

    def __init__(self, tally: LocalTally, origin: str) -> None:
        self.tally = tally
        self.origin = origin
        self.sequence = 0
        self.on_drop: Callable[[int], None] = lambda count: None

    async def collect(self, final: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
        rows = self.tally.swap()
        if not len(rows):
            return []
        first = self.sequence + 1
        bodies = batch_bodies(rows, lambda i: f"{self.origin}:{first + i}")
        self.sequence += len(bodies)
        return [(ident, body, {}) for ident, body in bodies]

    async def acknowledged(self, after: dict[str, Any]) -> None:
        """Nothing to do: the sums left the process when they were spooled."""


class UsageReporter:
    """Collects every ``interval`` seconds and sends what the spool holds."""

    def __init__(
        self,
        tally: Tally,
        source: UsageSource,
        spool: Spool,
        url: str,
        headers: Callable[[], dict[str, str]],
        interval: float,
        registry: CollectorRegistry,
    ) -> None:
        self.tally = tally
        self.source = source
        self.spool = spool
        self.url = url.rstrip("/") + "/dp/v1/usage"
        self.headers = headers
        self.interval = interval
        self.sent = Counter(
            "meshgate_usage_batches_sent",
            "Usage batches the control plane acknowledged.",
            registry=registry,
        )
        self.dropped = Counter(
            "meshgate_usage_batches_dropped",
            "Usage batches dropped unsent: the spool was full (the oldest go first).",
            registry=registry,
        )
        self.refused = Counter(
            "meshgate_usage_batches_refused",
            "Usage batches the control plane refused for good (a 4xx other than 401, 403, "
            "408 and 429).",
            registry=registry,
        )
        self.pending = Gauge(
            "meshgate_usage_batches_pending",
            "Usage batches spooled and not yet acknowledged.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        spool.on_drop = source.on_drop = self._dropped
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _dropped(self, count: int) -> None:
        self.dropped.inc(count)
        self.pending.set(len(self.spool))

    async def start(self) -> None:
        await self.spool.open()
        self.pending.set(len(self.spool))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._collect_loop()), loop.create_task(self._send_loop())]

    async def stop(self, grace: float) -> None:
        """Spool the last sums and send while ``grace`` seconds last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        collector, sender = self._tasks
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        self.tally.flush()
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
                await self._collect(final=True)
                self._wake.set()  # no backoff now: try at once
                while len(self.spool) and not sender.done():
                    self.spool.changed.clear()
                    await self.spool.changed.wait()
        except TimeoutError:
            log.warning(
                "stopping with %d usage batches unsent; they are sent at the next start",
                len(self.spool),
            )
        except Exception:
            log.exception("usage not flushed on stop")
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    async def _collect_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._collect(final=False)
            except Exception:
                log.exception("usage collection failed; tried again in %ss", self.interval)

    async def _collect(self, final: bool) -> None:
        for ident, body, after in await self.source.collect(final):
            await self.spool.add(ident, body, after)
        self.pending.set(len(self.spool))

    async def _send_loop(self) -> None:
        backoff = BACKOFF_MIN
        spool = self.spool
        while True:
            batch = spool.oldest()
            if batch is None:
                spool.changed.clear()
                await spool.changed.wait()
                continue
            spool.sending = batch.name
            try:
                body = await spool.read(batch)
                if body is None:
                    continue
                outcome = await self._post(batch.id, body)
            finally:
                spool.sending = None
            if outcome == "retry":
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            await spool.remove(batch)
            if outcome == "sent":
                self.sent.inc()
                try:
                    await self.source.acknowledged(batch.after)
                except Exception:
                    log.exception("usage batch %s acknowledged, follow-up failed", batch.id)
            else:
                self.refused.inc()
            self.pending.set(len(spool))
            spool.changed.set()

    async def _post(self, ident: str, body: bytes) -> str:
        """Send one batch: "sent", "refused" (for good) or "retry"."""
        headers = self.headers()
        headers["Content-Type"] = "application/json"
        try:
            response = await request(
                "POST",
                self.url,
                headers=headers,
                body=body,
                timeout=SEND_TIMEOUT,
                max_body=65536,
            )
        except HttpError as exc:
            log.debug("usage batch %s not sent: %s", ident, exc)
            return "retry"
        status = response.status
        if 200 <= status < 300:
            return "sent"
        detail = response.body[:300].decode("utf-8", "replace")
        if 400 <= status < 500 and status not in _RETRIED:
            log.error(
                "the control plane refused usage batch %s for good (%d): %s; dropped",
                ident,
                status,
                detail,
            )
            return "refused"
        log.debug("usage batch %s answered %d, retried: %s", ident, status, detail)
        return "retry"
