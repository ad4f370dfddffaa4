"""Usage batches on disk until the control plane acknowledges them, oldest first, bounded.

One file a batch, written atomically (temporary file, fsync, rename, fsync of the folder):
a line of JSON saying what to do once the batch is acknowledged, then the body as sent. A
file is deleted when its batch is acknowledged or refused for good. Past ``max_batches``
files or ``max_bytes``, the oldest batch is dropped with a warning and counted. The blocking
file work runs in a thread; the bookkeeping stays on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshgate.gateway._files import write_atomically

__all__ = ["Spool", "SpooledBatch"]

log = logging.getLogger("meshgate.gateway.usage")

_SUFFIX = ".batch"


@dataclass
class SpooledBatch:
    """One batch on disk: its file, size, id, and what to do once it is acknowledged."""

    name: str
    size: int
    id: str = ""
    after: dict[str, Any] = field(default_factory=dict)


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    header, newline, body = data.partition(b"\n")
    meta = json.loads(header) if newline else None
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str) or not body:
        raise ValueError("not a usage batch file")
    return meta, body


class Spool:
    """The batches of one gateway process not yet acknowledged, in ``directory``."""

    def __init__(
        self,
        directory: Path,
        max_batches: int,
        max_bytes: int,
        on_drop: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.directory = Path(directory)
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.on_drop = on_drop
        self._batches: OrderedDict[str, SpooledBatch] = OrderedDict()
        self._bytes = 0
        self._sequence = 0
        # The batch being sent is not dropped from under the sender.
        self.sending: str | None = None
        self.changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return self._bytes

    async def open(self) -> None:
        """Find the batches a previous run left (sent first: they are the oldest)."""
        found = await asyncio.to_thread(self._scan)
        for batch in found:
            self._batches[batch.name] = batch
            self._bytes += batch.size
        if found:
            log.info("%d usage batches left unsent by the last run will be sent", len(found))
            self.changed.set()
        self._bound()

    def _scan(self) -> list[SpooledBatch]:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.endswith(_SUFFIX):
                found.append(SpooledBatch(entry.name, entry.stat().st_size))
            elif entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a write the last run did not finish
        return found

    async def add(self, batch_id: str, body: bytes, after: dict[str, Any] | None = None) -> None:
        """Keep a new batch (on disk before this returns), dropping the oldest past the
        bounds."""
        self._sequence += 1
        name = f"{time.time_ns():020d}-{self._sequence:06d}{_SUFFIX}"
        header = json.dumps({"id": batch_id, "after": after or {}}).encode() + b"\n"
        await asyncio.to_thread(write_atomically, self.directory / name, (header, body))
        size = len(header) + len(body)
        self._batches[name] = SpooledBatch(name, size, batch_id, after or {})
        self._bytes += size
        self._bound()
        self.changed.set()

    def oldest(self) -> SpooledBatch | None:
        for batch in self._batches.values():
            return batch
        return None

    async def read(self, batch: SpooledBatch) -> bytes | None:
        """The body of ``batch`` (its id and follow-up filled in); None when the file is gone
        or unreadable (then it is forgotten and counted as dropped)."""
        try:
            meta, body = await asyncio.to_thread(_read, self.directory / batch.name)
        except (OSError, ValueError) as exc:
            if batch.name in self._batches:
                log.warning("usage batch file %s unreadable, dropped: %s", batch.name, exc)
                await self.remove(batch)
                self.on_drop(1)
            return None
        batch.id = meta["id"]
        after = meta.get("after")
        batch.after = after if isinstance(after, dict) else {}
        return body

    async def remove(self, batch: SpooledBatch) -> None:
        """Forget ``batch`` and delete its file."""
        if self._batches.pop(batch.name, None) is not None:
            self._bytes -= batch.size
        await asyncio.to_thread((self.directory / batch.name).unlink, missing_ok=True)

    def _bound(self) -> None:
        dropped = []
        while len(self._batches) > self.max_batches or self._bytes > self.max_bytes:
            victim = next((b for b in self._batches.values() if b.name != self.sending), None)
            if victim is None:
                break
            del self._batches[victim.name]
            self._bytes -= victim.size
            dropped.append(victim)
        if not dropped:
            return
        for victim in dropped:
            try:
                (self.directory / victim.name).unlink()
            except OSError:
                pass
        log.warning(
            "usage spool full (%d batches, %d bytes at most): dropped the %d oldest unsent "
            "batches; their usage is lost",
            self.max_batches,
            self.max_bytes,
            len(dropped),
        )
        self.on_drop(len(dropped))
