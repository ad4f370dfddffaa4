#!/usr/bin/env python3
"""Analytics: ingest rate and series latency, on SQLite and PostgreSQL.

1. Ingest. 20 simulated gateways report a minute of traffic of 50,000 active applications
   (each application seen by a few gateways, two metrics, a 200 and a 429 row): the batches
   are parsed (UsageBatch, as the endpoint does) and stored by ``analytics.ingest.ingest``
   in one thread. Peer, in the same run: the same number of rows inserted plainly (one
   multi-row INSERT per 500 rows into a table of the same shape, no upsert, no roll-up):
   the database's floor. Target: the rows a minute of 200,000 requests/s makes, stored in
   under a minute on one core.
2. Series. A year of daily roll-ups for 50,000 applications (18.25 M rows) is written with
   one INSERT ... SELECT, then a real ``meshgate control`` answers 300 requests for one
   application's 30-day daily series (GET /admin/api/analytics/usage). Peer: the same query
   run directly on the database. Target: p99 under 50 ms.

Not a pass/fail test. ``python bench/analytics/run.py [--stores sqlite,postgresql]
[--apps 50000] [--days 365]``; PostgreSQL from MESHGATE_POSTGRES_URL or 127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from meshgate.analytics.ingest import ingest
from meshgate.config.usage import UsageBatch
from meshgate.control._db import Database

REPO = Path(__file__).resolve().parent.parent.parent
TOKEN = "mgt_bench-analytics-token-0123456789abcdef"
MINUTE = 1_796_083_200  # 2026-12-01T00:00Z
GATEWAYS = 20


def _store(kind: str, workdir: Path) -> tuple[str, Any]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", None
    base = os.environ.get("MESHGATE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = Database(base)
    with admin.engine.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", (admin, schema)


def _drop(cleanup: Any) -> None:
    if cleanup is not None:
        admin, schema = cleanup
        with admin.engine.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _batches(apps: int, rng: random.Random) -> list[bytes]:
    """A minute of traffic from 20 gateways: each application on 3 of them."""
    per_gateway: list[dict[str, list[Any]]] = [
        {"usage": [], "responses": []} for _ in range(GATEWAYS)
    ]
    for a in range(apps):
        app = f"app-{a}"
        for g in rng.sample(range(GATEWAYS), 3):
            hits = rng.randint(1, 160)
            part = per_gateway[g]
            part["usage"].append(["shop", app, "hits", MINUTE, hits])
            part["usage"].append(["shop", app, "orders", MINUTE, max(1, hits // 4)])
            part["responses"].append(["shop", app, 200, "ok", MINUTE, hits])
            part["responses"].append(["shop", app, 429, "limited", MINUTE, 1])
    return [
        json.dumps({"id": f"gw-{g}:{uuid.uuid4()}", **part}).encode()
        for g, part in enumerate(per_gateway)
    ]


def bench_ingest(url: str, apps: int) -> dict[str, Any]:
    db = Database(url)
    db.migrate()
    bodies = _batches(apps, random.Random(1))
    rows = 0
    started = time.process_time()
    wall = time.perf_counter()
    for body in bodies:
        batch = UsageBatch.model_validate_json(body)
        rows += len(batch.usage) + len(batch.responses)
        ingest(db, batch, "bench")
    ours_wall = time.perf_counter() - wall
    ours_cpu = time.process_time() - started
    # Peer: the same rows, inserted plainly into a scratch table.
    with db.engine.begin() as c:
        c.execute(
            text(
                "CREATE TABLE plain_rows (product VARCHAR(200), application VARCHAR(200), "
                "metric VARCHAR(200), start BIGINT, value BIGINT)"
            )
        )
    flat = [
        {"p": r[0], "a": r[1], "m": str(r[2]), "s": r[-2], "v": r[-1]}
        for body in bodies
        for part in ("usage", "responses")
        for r in json.loads(body)[part]
    ]
    wall = time.perf_counter()
    with db.writer() as session, session.begin():
        for i in range(0, len(flat), 500):
            chunk = flat[i : i + 500]
            values = ", ".join(f"(:p{j}, :a{j}, :m{j}, :s{j}, :v{j})" for j in range(len(chunk)))
            params = {f"{k}{j}": v for j, row in enumerate(chunk) for k, v in row.items()}
            session.execute(text(f"INSERT INTO plain_rows VALUES {values}"), params)
    peer_wall = time.perf_counter() - wall
    db.dispose()
    requests = sum(r[-1] for body in bodies for r in json.loads(body)["responses"] if r[2] == 200)
    return {
        "batches": len(bodies),
        "rows": rows,
        "seconds": round(ours_wall, 2),
        "cpu_seconds": round(ours_cpu, 2),
        "rows_per_second": round(rows / ours_wall),
        "plain_insert_rows_per_second": round(rows / peer_wall),
        "ratio_to_plain_insert": round((rows / ours_wall) / (rows / peer_wall), 2),
        # The minute's traffic (requests/s over it) and how much faster than real time a
        # minute of it was stored: above 1, ingest keeps up on one core.
        "requests_per_second_in_the_minute": round(requests / 60),
        "realtime_headroom": round(60 / ours_wall, 1),
    }


def _fill_year(db: Database, apps: int, days: int) -> float:
    first_day = MINUTE - days * 86400
    started = time.perf_counter()
    with db.engine.begin() as c:
        if db.is_sqlite:
            c.execute(
                text(
                    "WITH RECURSIVE a(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM a WHERE n < "
                    ":apps - 1), d(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM d WHERE n < "
                    ":days - 1) INSERT INTO usage_rollups (granularity, product, start, "
                    "application, metric, account_id, value) SELECT 'day', 'shop', "
                    ":first + d.n * 86400, 'app-' || a.n, 'hits', a.n, (a.n + d.n) % 1000 "
                    "FROM a, d"
                ),
                {"apps": apps, "days": days, "first": first_day},
            )
        else:
            c.execute(
                text(
                    "INSERT INTO usage_rollups (granularity, product, start, application, "
                    "metric, account_id, value) SELECT 'day', 'shop', :first + d * 86400, "
                    "'app-' || a, 'hits', a, (a + d) % 1000 FROM generate_series(0, :apps - 1) "
                    "a, generate_series(0, :days - 1) d"
                ),
                {"apps": apps, "days": days, "first": first_day},
            )
            c.execute(text("ANALYZE usage_rollups"))
    return time.perf_counter() - started


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1] * 1000, 2),
    }


def bench_series(url: str, workdir: Path, apps: int, days: int) -> dict[str, Any]:
    db = Database(url)
    db.migrate()
    fill = _fill_year(db, apps, days)
    port = 18000 + random.randint(0, 999)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshgate",
            "control",
            "--database-url",
            url,
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-token",
            TOKEN,
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rng = random.Random(2)
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/admin/api",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/products").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("control plane did not start")
            time.sleep(0.2)
        since = "2026-11-01T00:00:00Z"
        until = "2026-12-01T00:00:00Z"
        api: list[float] = []
        for i in range(330):
            app = f"app-{rng.randrange(apps)}"
            t = time.perf_counter()
            response = client.get(
                "/analytics/usage",
                params={"application": app, "granularity": "day", "since": since, "until": until},
            )
            elapsed = time.perf_counter() - t
            assert response.status_code == 200 and len(response.json()["series"]) == 30
            if i >= 30:  # the first requests warm the caches
                api.append(elapsed)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    direct: list[float] = []
    query = text(
        "SELECT start, sum(value) FROM usage_rollups WHERE granularity = 'day' AND "
        "metric = 'hits' AND application = :app AND start >= :s AND start < :u GROUP BY start"
    )
    with db.engine.connect() as c:
        for i in range(330):
            t = time.perf_counter()
            c.execute(
                query, {"app": f"app-{rng.randrange(apps)}", "s": 1793491200, "u": 1796083200}
            ).all()
            if i >= 30:
                direct.append(time.perf_counter() - t)
    db.dispose()
    ours, peer = _percentiles(api), _percentiles(direct)
    return {
        "rows_stored": apps * days,
        "fill_seconds": round(fill, 1),
        "api": ours,
        "direct_query": peer,
        "api_p99_over_query_p99": round(ours["p99_ms"] / max(peer["p99_ms"], 0.001), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--apps", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--skip-series", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "apps": args.apps,
    }
    for kind in args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url, cleanup = _store(kind, Path(tmp))
            try:
                report[f"{kind}_ingest"] = bench_ingest(url, args.apps)
                print(json.dumps({kind: report[f"{kind}_ingest"]}), flush=True)
            finally:
                _drop(cleanup)
            if not args.skip_series:
                url, cleanup = _store(kind, Path(tmp))
                try:
                    report[f"{kind}_series"] = bench_series(url, Path(tmp), args.apps, args.days)
                    print(json.dumps({kind: report[f"{kind}_series"]}), flush=True)
                finally:
                    _drop(cleanup)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
