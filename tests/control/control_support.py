"""Helpers for control-plane tests: a real ``meshgate control`` on loopback, on SQLite and on
PostgreSQL (``MESHGATE_DATABASE_URL``, each test in a schema of its own)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from harness import Proc, free_port, service_url, unavailable

TOKEN = "mgt_test-admin-token-0123456789abcdef"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    return service_url("DATABASE", DEFAULT_POSTGRES)


def postgres_schema(base: str) -> Iterator[str]:
    """A fresh schema on the PostgreSQL server for one test, dropped afterwards."""
    import psycopg

    plain = base.replace("postgresql+psycopg://", "postgresql://")
    try:
        conn = psycopg.connect(plain, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {base} cannot be reached: {str(exc).strip()[:200]}")
        return
    schema = f"mg_{uuid.uuid4().hex[:12]}"
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in base else "?"
        try:
            yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


class ControlPlane:
    """A running ``meshgate control`` and an authenticated client of its API."""

    def __init__(self, proc: Proc, port: int, database_url: str, workdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.database_url = database_url
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"
        self.token = TOKEN
        self.api = httpx.Client(
            base_url=f"{self.url}/admin/api",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    def log(self) -> str:
        return self.proc.stdout() + self.proc.stderr()

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        """POST that must succeed; the created resource's body."""
        response = self.api.post(path, json=json, **kwargs)
        assert response.status_code in (200, 201), (path, response.status_code, response.text)
        return response.json()

    def snapshot(self, env: str, **params: Any) -> httpx.Response:
        return httpx.get(
            f"{self.url}/dp/v1/snapshot",
            params={"env": env, **params},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=90,
        )

    def wait_snapshot(self, env: str, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        """The first snapshot of ``env`` for which ``predicate(document)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.snapshot(env).json()
            if predicate(doc) or time.monotonic() > deadline:
                assert predicate(doc), f"no {env} snapshot matched within {timeout}s: {doc}"
                return dict(doc)
            time.sleep(0.05)

    def stop(self) -> int:
        self.api.close()
        return self.proc.stop()


def start_control(
    workdir: Path, database_url: str, port: int | None = None, *extra: str
) -> ControlPlane:
    port = port or free_port()
    proc = Proc(
        [
            "control",
            "--database-url",
            database_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-token",
            TOKEN,
            *extra,
        ],
        workdir,
        f"control-{port}",
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"meshgate control exited: {proc.stderr()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"meshgate control not up after 30s: {proc.stderr()[-2000:]}")
        time.sleep(0.05)
    return ControlPlane(proc, port, database_url, workdir)


def make_product(cp: ControlPlane, backend_port: int = 9, **fields: Any) -> dict[str, Any]:
    body = {
        "name": "echo",
        "path_prefix": "/echo",
        "auth": {"type": "api_key"},
        "backend": f"http://127.0.0.1:{backend_port}",
        **fields,
    }
    return dict(cp.post("/products", body))


def make_subscription(cp: ControlPlane, product_id: int) -> dict[str, Any]:
    """An account, a published plan and a live application on ``product_id``."""
    account = cp.post("/accounts", {"name": f"acme-{uuid.uuid4().hex[:6]}"})
    plan = cp.post(
        f"/products/{product_id}/plans",
        {"name": f"basic-{uuid.uuid4().hex[:6]}", "state": "published"},
    )
    app = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "app"}
    )
    return {"account": account, "plan": plan, "application": app}
