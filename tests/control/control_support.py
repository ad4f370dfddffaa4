"""Helpers for control-plane tests: a real ``meshgate control`` on loopback, on SQLite and on
PostgreSQL (``MESHGATE_DATABASE_URL``, each test in a schema of its own)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml
from harness import Proc, free_port, service_url, unavailable, wait_port
from harness import within as within  # re-exported for the suites that import it here

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
    workdir: Path,
    database_url: str,
    port: int | None = None,
    *extra: str,
) -> ControlPlane:
    """``meshgate control`` on ``database_url``, with ``extra`` options."""
    port = port or free_port()
    listen = f"127.0.0.1:{port}"
    args = ["--database-url", database_url, "--listen", listen, "--admin-token", TOKEN]
    proc = Proc(["control", *args, *extra], workdir, f"control-{port}")
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


def problem(response: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """Assert ``response`` is an RFC 9457 problem with ``status`` naming ``field``; its body."""
    assert response.status_code == status, (status, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = dict(response.json())
    assert body["status"] == status and body["detail"], body
    if field is not None:
        fields = [e["field"] for e in body.get("errors", ())]
        assert field in fields, (field, body)
    return body


def etag_of(response: httpx.Response) -> str:
    value = response.headers.get("etag")
    assert value and value.startswith('"'), response.headers
    return str(value)


def dump_database(database_url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of the control plane's store, read with SQL (not the API)."""
    from sqlalchemy import create_engine, inspect, text

    from meshgate.control._db import normalize_url

    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
            return {
                table: [dict(r._mapping) for r in conn.execute(text(f'SELECT * FROM "{table}"'))]
                for table in tables
            }
    finally:
        engine.dispose()


def count_rows(database_url: str, table: str) -> int:
    return len(dump_database(database_url)[table])


def audit(cp: ControlPlane, **filters: Any) -> list[dict[str, Any]]:
    """The audit entries matching ``filters``, newest first."""
    response = cp.api.get("/audit", params={"per_page": 500, **filters})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def full_product(cp: ControlPlane, name: str, backend_port: int = 9) -> dict[str, Any]:
    """A product with a method, a backend, a rule, a published plan with a limit and a
    pricing rule, an account and a live application: the ids of each."""
    product = make_product(cp, backend_port, name=name, path_prefix=f"/{name}")
    [hits] = cp.api.get(f"/products/{product['id']}/metrics").json()["items"]
    method = cp.post(
        f"/products/{product['id']}/metrics", {"name": "search", "parent_id": hits["id"]}
    )
    rule = cp.post(
        f"/products/{product['id']}/mapping_rules",
        {"http_method": "GET", "pattern": "/search", "metric_id": method["id"], "last": True},
    )
    plan = cp.post(f"/products/{product['id']}/plans", {"name": "basic", "state": "published"})
    limit = cp.post(
        f"/plans/{plan['id']}/limits", {"metric_id": hits["id"], "period": "minute", "value": 5}
    )
    pricing = cp.post(
        f"/plans/{plan['id']}/pricing_rules",
        {"metric_id": hits["id"], "min": 1, "max": 100, "cost_per_unit": "0.01"},
    )
    account = cp.post("/accounts", {"name": f"{name}-dev"})
    app = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "app"}
    )
    return {
        "product": product,
        "hits": hits,
        "method": method,
        "rule": rule,
        "plan": plan,
        "limit": limit,
        "pricing": pricing,
        "account": account,
        "application": app,
    }


# The bound: what the admin changes is enforced at gateways within 2 s.
PROPAGATION_S = 2.0


class AttachedGateway:
    def __init__(self, proc: Proc, port: int, admin_port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=10)

    def config(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.admin_url}/config", timeout=10).json())


@contextmanager
def attached_gateway(
    workdir: Path,
    cp_url: str,
    token: str,
    env: str = "production",
    name: str = "gw1",
    settings_extra: dict[str, Any] | None = None,
) -> Iterator[AttachedGateway]:
    """A gateway attached to the control plane; ``settings_extra`` joins its local settings
    (a ``tls`` listener, say)."""
    port, admin_port = free_port(), free_port()
    settings = workdir / f"{name}-settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin_port}",
                "limits": {"backend": "memory"},
                **(settings_extra or {}),
            }
        )
    )
    proc = Proc(
        [
            "gateway",
            "--control-plane",
            cp_url,
            "--token",
            token,
            "--env",
            env,
            "--config",
            str(settings),
            "--cache-dir",
            str(workdir / f"{name}-cache"),
            "--name",
            name,
        ],
        workdir,
        name,
    )
    try:
        wait_port(admin_port, proc=proc.popen, timeout=30)
        wait_port(port, proc=proc.popen, timeout=30)
        yield AttachedGateway(proc, port, admin_port)
    finally:
        proc.stop()
