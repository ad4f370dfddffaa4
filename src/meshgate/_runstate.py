"""What runs under a data directory: each long-running command writes a small state file
there while it runs (its pid and addresses), and `meshgate status` reads them back."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["alive", "answers", "forget", "read", "record"]


def record(data_dir: Path, name: str, state: dict[str, Any]) -> Path:
    """Write ``DATA_DIR/NAME.run.json`` (atomically); the caller removes it with
    :func:`forget` when it stops."""
    path = data_dir / f"{name}.run.json"
    tmp = path.with_suffix(".tmp")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps({"pid": os.getpid(), **state}, indent=2) + "\n")
    tmp.replace(path)
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def read(data_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        state = json.loads((data_dir / f"{name}.run.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def answers(address: str | None, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection at ``HOST:PORT``."""
    if not address:
        return False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
