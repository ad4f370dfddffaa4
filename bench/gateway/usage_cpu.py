#!/usr/bin/env python3
"""The gateway's CPU per request with usage reporting on, against off, on both backends.

A real ``meshgate control`` (SQLite) holds the example product (its ``hits`` minute limit
raised so nothing is refused) and an echo upstream answers; a gateway attached to the control
plane (``usage.enabled`` true or false, in-memory or Redis counters, access log off) serves
``wrk -t1 -c50 -d10s`` of ``GET /echo/hello`` with a key. The gateway has core 1 to itself;
wrk, the upstream and the control plane share core 0. Reported per variant: requests/s and
the gateway process's CPU microseconds per request (utime+stime from /proc over the measured
run, divided by the requests completed); the ratio is usage on against off on the same
backend, measured in the same run, variants alternating, the best of ``--repeat`` kept.

Not a pass/fail test. Needs Debian's ``wrk`` and Redis (MESHGATE_REDIS_URL or
127.0.0.1:6379). ``python bench/gateway/usage_cpu.py [--repeat 2] [--seconds 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import yaml
from _procs import cpu_per_request, free_port, spawn, wait_ok

TOKEN = "mgt_bench-usage-token-0123456789abcdef"


def _run_variant(
    workdir: Path, control: str, backend: dict[str, Any], usage: bool, seconds: int
) -> dict[str, Any]:
    port, admin = free_port(), free_port()
    settings = workdir / "gw.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "access_log": False,
                "limits": backend,
                "usage": {"enabled": usage},
            }
        )
    )
    name = f"gw-{uuid.uuid4().hex[:6]}"
    gw = spawn(
        [
            "gateway",
            "--control-plane",
            control,
            "--token",
            TOKEN,
            "--env",
            "production",
            "--config",
            str(settings),
            "--cache-dir",
            str(workdir / name),
            "--name",
            name,
        ],
        "1",
        workdir,
        name,
    )
    try:
        url = f"http://127.0.0.1:{port}/echo/hello"
        wait_ok(url, headers={"X-API-Key": "k1"})
        return cpu_per_request(gw.pid, url, seconds)
    finally:
        gw.terminate()
        gw.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    redis_url = os.environ.get("MESHGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream, cp_port = free_port(), free_port()
        echo = spawn(["echo", f"127.0.0.1:{upstream}"], "0", workdir, "echo")
        db = f"sqlite:///{workdir / 'control.db'}"
        cp = spawn(
            [
                "control",
                "--database-url",
                db,
                "--listen",
                f"127.0.0.1:{cp_port}",
                "--admin-token",
                TOKEN,
            ],
            "0",
            workdir,
            "control",
        )
        control = f"http://127.0.0.1:{cp_port}"
        try:
            wait_ok(f"{control}/healthz")
            example = yaml.safe_load(
                resources.files("meshgate.examples").joinpath("gateway.yaml").read_text()
            )
            product = example["products"][0]
            product["backend"] = f"http://127.0.0.1:{upstream}"
            product["plans"][0]["limits"][0]["value"] = 10**12
            product.pop("policies", None)
            api = httpx.Client(
                base_url=f"{control}/admin/api", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            api.post(
                "/declarative",
                content=yaml.safe_dump({"products": [product]}),
                headers={"Content-Type": "application/yaml"},
            ).raise_for_status()
            for p in api.get("/products").json()["items"]:
                api.post(f"/products/{p['id']}/promote").raise_for_status()
            results: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeat):
                for backend_name in ("memory", "redis"):
                    backend: dict[str, Any] = {"backend": backend_name}
                    if backend_name == "redis":
                        backend |= {
                            "redis_url": redis_url,
                            "key_prefix": f"b{uuid.uuid4().hex[:8]}",
                        }
                    # Each order in turn: whichever runs second is not always the same.
                    for usage in (False, True) if repeat % 2 == 0 else (True, False):
                        key = f"{backend_name}-usage-{'on' if usage else 'off'}"
                        result = _run_variant(workdir, control, backend, usage, args.seconds)
                        results.setdefault(key, []).append(result)
                        print(key, json.dumps(result), flush=True)
            best = {k: min(v, key=lambda r: r["cpu_us_per_request"]) for k, v in results.items()}
            report: dict[str, Any] = {
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, Python {platform.python_version()}",
                **best,
            }
            for backend_name in ("memory", "redis"):
                on = best[f"{backend_name}-usage-on"]["cpu_us_per_request"]
                off = best[f"{backend_name}-usage-off"]["cpu_us_per_request"]
                report[f"{backend_name}_cpu_on_over_off"] = round(on / off, 3)
            print(json.dumps(report, indent=2))
        finally:
            for proc in (cp, echo):
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
