"""Files a gateway keeps (the snapshot cache, the usage spool), written so that a crash leaves
either the old file or the new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, parts: Iterable[bytes]) -> None:
    """Write ``parts`` to a temporary file beside ``path`` (readable by its owner only),
    fsync it, rename it over ``path``, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            # Part by part: joined, a copy of 10 MB would hold the GIL for milliseconds.
            for part in parts:
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
