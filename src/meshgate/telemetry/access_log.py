"""The JSON access log: whole lines, written so that worker processes never interleave."""

from __future__ import annotations

import os
import select

__all__ = ["AccessLog"]

# Writes of at most PIPE_BUF bytes to a pipe are atomic, and appends to a file are
# made one write at a time: a chunk of whole lines never mixes with another worker's.
_ATOMIC = getattr(select, "PIPE_BUF", 4096)


class AccessLog:
    """Buffers lines and writes them in chunks of whole lines to a file descriptor."""

    __slots__ = ("fd", "max_pending", "dropped", "_pending")

    def __init__(self, fd: int = 1, max_pending: int = 64) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: list[bytes] = []

    def write(self, line: str) -> None:
        """Queue one line (with its newline); written at the next flush."""
        pending = self._pending
        pending.append(line.encode())
        if len(pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        chunk: list[bytes] = []
        size = 0
        for line in pending:
            if chunk and size + len(line) > _ATOMIC:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            # A closed or broken log pipe must not take the gateway down.
            self.dropped += data.count(b"\n")
