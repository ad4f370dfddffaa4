"""The embedded SQLite store is readable by its owner only, with the files SQLite makes
beside it: it holds JWT secrets, key and token hashes and the audit log."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from control_support import TOKEN
from harness import Proc, free_port

from meshgate.control._db import Database


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_default_store_and_its_companions_are_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    # The usual umask, which leaves new files readable by all.
    with umask(0o022):
        proc = Proc(
            ["control", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}",
             "--admin-token", TOKEN],
            tmp_path,
            "control",
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.popen.poll() is None, proc.stderr()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, proc.stderr()
            time.sleep(0.05)
        created = httpx.post(
            f"http://127.0.0.1:{port}/admin/api/products",
            json={"name": "echo", "auth": {"type": "api_key"}, "backend": "http://127.0.0.1:9"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        files = {p.name: oct(mode(p)) for p in data.glob("control.db*")}
        assert {"control.db", "control.db-wal", "control.db-shm"} <= set(files), files
        assert set(files.values()) == {"0o600"}, files
    finally:
        proc.stop()
    assert mode(data / "control.db") == 0o600


def test_a_store_in_rollback_journal_mode_keeps_its_journal_private(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with umask(0o022):
        Database(f"sqlite:///{path}").dispose()
        assert mode(path) == 0o600
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=DELETE")
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("CREATE TABLE t (x)")
            connection.execute("INSERT INTO t VALUES (1)")
            assert mode(tmp_path / "store.db-journal") == 0o600
            connection.execute("COMMIT")
        finally:
            connection.close()


def test_an_existing_store_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)
    database = Database(f"sqlite:///{path}")
    database.migrate()
    database.dispose()
    assert mode(path) == 0o640
