"""Starting the control plane as a newcomer does: a busy port costs nothing, and the first
admin token cannot be lost before it has been used."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
from harness import Proc, free_port


def _start(tmp_path: Path, data: Path, port: int, name: str) -> Proc:
    return Proc(
        ["control", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"], tmp_path, name
    )


def _token_when_up(proc: Proc, port: int) -> str | None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.popen.poll() is None, proc.stderr()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, proc.stderr()[-2000:]
        time.sleep(0.05)
    found = re.search(r"admin token: (\S+)", proc.stdout())
    return found.group(1) if found else None


def test_a_busy_port_is_named_and_nothing_is_stored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start(tmp_path, data, port, "busy")
        assert proc.popen.wait(30) == 1
        proc.stop()
    assert (
        f"error: port {port} is in use: another meshgate control or meshgate up? "
        "stop it or pass --listen" in proc.stderr()
    )
    assert "Traceback" not in proc.stderr()
    assert not (data / "control.db").exists() and not (data / "bootstrap-token").exists()


def test_the_first_token_is_shown_again_until_it_is_used(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    first = _start(tmp_path, data, port, "first")
    try:
        token = _token_when_up(first, port)
    finally:
        first.stop()
    assert token is not None, first.stdout()
    kept = data / "bootstrap-token"
    assert kept.stat().st_mode & 0o777 == 0o600
    # Output lost, or a start that failed: the next start shows the same token.
    second = _start(tmp_path, data, port, "second")
    try:
        assert _token_when_up(second, port) == token
        api = f"http://127.0.0.1:{port}/admin/api/products"
        assert httpx.get(api, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(api, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        second.stop()
    # Used once: it is not shown any more, and its file is gone.
    third = _start(tmp_path, data, port, "third")
    try:
        assert _token_when_up(third, port) is None
        assert token not in third.stdout() and not kept.exists()
    finally:
        third.stop()
