#!/usr/bin/env python3
"""The gateway's CPU per request with tracing on (1 % of new traces sampled) against off.

A gateway run from a file (the example product, its limit raised so nothing is refused,
access log off, in-memory counters) serves ``wrk -t1 -c50 -d10s`` of ``GET /echo/hello``
with a key and no ``traceparent``: with tracing on, every request starts a trace, 1 % are
sampled, their spans are batched and exported over OTLP/HTTP to a collector stand-in that
answers 200 to every batch. The gateway has core 1 to itself; wrk, the echo upstream and
the collector share core 0. Reported per variant: requests/s and the gateway process's CPU
microseconds per request (utime+stime from /proc over the measured run, divided by the
requests completed); the ratio is on against off measured in the same run, the variants
alternating, the best of ``--repeat`` kept. Target: at most 1.05. A 100 % variant shows
what a sampled request costs, for reference.

Before the load, ``--micro`` (on by default) times the hop itself in this process: the
unsampled paths (a new trace, an unsampled caller's context passed on) and a sampled one.

Not a pass/fail test. Needs Debian's ``wrk``.
``python bench/gateway/tracing.py [--repeat 2] [--seconds 10] [--no-micro]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import timeit
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from _procs import cpu_per_request, free_port, spawn, wait_ok


class _Collector:
    """A stand-in OTLP/HTTP collector: takes every batch, answers 200, counts the bytes."""

    def __init__(self) -> None:
        collector = self
        self.batches = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                collector.batches += 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _product(upstream: int) -> dict[str, Any]:
    example = yaml.safe_load(
        resources.files("meshgate.examples").joinpath("gateway.yaml").read_text()
    )
    product = example["products"][0]
    product["backend"] = f"http://127.0.0.1:{upstream}"
    product["plans"][0]["limits"][0]["value"] = 10**12
    product.pop("policies", None)
    return dict(product)


def _run_variant(
    workdir: Path, product: dict[str, Any], tracing: dict[str, Any], seconds: int
) -> dict[str, Any]:
    port, admin = free_port(), free_port()
    config = workdir / f"gw-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "access_log": False,
                "limits": {"backend": "memory"},
                "tracing": tracing,
                "products": [product],
            }
        )
    )
    gw = spawn(["gateway", "--config", str(config), "--no-watch"], "1", workdir, config.stem)
    try:
        url = f"http://127.0.0.1:{port}/echo/hello"
        wait_ok(url, headers={"X-API-Key": "k1"})
        return cpu_per_request(gw.pid, url, seconds)
    finally:
        gw.terminate()
        gw.wait(30)


def micro(endpoint: str) -> dict[str, float]:
    """Microseconds per hop, in this process, on a typical request's header list."""
    from meshgate.config.tracing import TracingSettings
    from meshgate.telemetry.tracing import SERVER, Tracing

    head = [
        (b"host", b"api.example.com"),
        (b"user-agent", b"wrk"),
        (b"accept", b"*/*"),
        (b"x-api-key", b"k1"),
        (b"x-forwarded-for", b"10.0.0.1"),
    ]
    unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    sampled = unsampled[:-2] + b"01"
    results: dict[str, float] = {}
    for rate, label, incoming in (
        (0.01, "new_trace_unsampled", None),
        (0.01, "unsampled_caller_passed_on", unsampled),
        (1.0, "sampled_span_started_and_ended", sampled),
    ):
        tracing = Tracing(TracingSettings(enabled=True, endpoint=endpoint, sample_rate=rate), "b")

        def hop(tracing: Tracing = tracing, incoming: bytes | None = incoming) -> None:
            raw = list(head)
            if incoming is not None:
                raw.append((b"traceparent", incoming))
            span = tracing.http_hop(raw, "GET", SERVER)
            if span is not None:
                tracing.end_http(span, 200, {"http.request.method": "GET"}, server=True)

        def baseline() -> None:
            list(head)

        n = 20000 if rate < 1 else 5000
        cost = min(timeit.repeat(hop, number=n, repeat=5)) / n
        base = min(timeit.repeat(baseline, number=n, repeat=5)) / n
        results[f"{label}_us"] = round((cost - base) * 1e6, 2)
        tracing.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    collector = _Collector()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
    }
    if args.micro:
        report["hop"] = micro(collector.endpoint)
        print("hop", json.dumps(report["hop"]), flush=True)
    variants = {
        "off": {"enabled": False},
        # Propagation alone: every request carries a traceparent on, none is sampled.
        "on-0pct": {"enabled": True, "endpoint": collector.endpoint, "sample_rate": 0.0},
        "on-1pct": {"enabled": True, "endpoint": collector.endpoint, "sample_rate": 0.01},
        "on-100pct": {"enabled": True, "endpoint": collector.endpoint, "sample_rate": 1.0},
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream = free_port()
        echo = spawn(["echo", f"127.0.0.1:{upstream}"], "0", workdir, "echo")
        try:
            wait_ok(f"http://127.0.0.1:{upstream}/")
            product = _product(upstream)
            results: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeat):
                # Each order in turn: whichever runs second is not always the same.
                names = list(variants) if repeat % 2 == 0 else list(reversed(variants))
                for name in names:
                    result = _run_variant(workdir, product, variants[name], args.seconds)
                    results.setdefault(name, []).append(result)
                    print(name, json.dumps(result), flush=True)
            best = {k: min(v, key=lambda r: r["cpu_us_per_request"]) for k, v in results.items()}
            report.update(best)
            off = best["off"]["cpu_us_per_request"]
            report["cpu_on_0pct_over_off"] = round(best["on-0pct"]["cpu_us_per_request"] / off, 3)
            report["cpu_on_1pct_over_off"] = round(best["on-1pct"]["cpu_us_per_request"] / off, 3)
            report["cpu_on_100pct_over_off"] = round(
                best["on-100pct"]["cpu_us_per_request"] / off, 3
            )
            report["batches_exported"] = collector.batches
            print(json.dumps(report, indent=2))
        finally:
            echo.terminate()
            echo.wait(30)
            collector.server.shutdown()


if __name__ == "__main__":
    main()
