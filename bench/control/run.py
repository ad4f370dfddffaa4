#!/usr/bin/env python3
"""Control-plane benchmark: compile and apply a snapshot of a large model.

Seeds 100 products, 1,000 plans, 50,000 applications and 100,000 keys, then measures:
the time to compile an environment's snapshot from the store, its size, and the time a
gateway takes to validate and build it (in-process, next to the floor of just parsing its
JSON, measured in the same run). ``--live`` also runs the swap under load against a real
control plane and gateway (see live.py). Not a pass/fail test; see README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import live  # noqa: E402
from seed import Size, seed  # noqa: E402

from meshgate.config import parse_snapshot  # noqa: E402
from meshgate.control import snapshots  # noqa: E402
from meshgate.control._db import Database  # noqa: E402
from meshgate.gateway._gateway import Gateway  # noqa: E402
from meshgate.limits import MemoryCounters  # noqa: E402
from meshgate.policies import schemas  # noqa: E402
from meshgate.telemetry.access_log import AccessLog  # noqa: E402
from meshgate.telemetry.metrics import GatewayMetrics  # noqa: E402

COMPILE_TARGET_S = 2.0
APPLY_TARGET_S = 1.0


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def measure_compile(url: str, rounds: int) -> tuple[dict[str, Any], str]:
    db = Database(url)
    compile_s, publish_s = [], []
    document = ""
    for i in range(rounds):
        with db.session() as session:
            t0 = time.perf_counter()
            compiled = snapshots.compile_environment(session, "production")
            compile_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            body, _digest = snapshots.canonical(compiled.products)
            document = f'{{"version":"{i + 1}","products":{body}}}'
            publish_s.append(time.perf_counter() - t0)
    db.dispose()
    raw = document.encode()
    return {
        "compile_s": _median(compile_s),
        "serialize_s": _median(publish_s),
        "total_s": _median([a + b for a, b in zip(compile_s, publish_s, strict=True)]),
        "size_bytes": len(raw),
        "gzip_bytes": len(gzip.compress(raw, 6)),
        "errors": compiled.errors,
    }, document


def measure_apply(document: str, rounds: int) -> dict[str, Any]:
    parse, validate_build, floor = [], [], []
    policy_schemas = schemas()
    for _ in range(rounds):
        t0 = time.perf_counter()
        json.loads(document)
        floor.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        config = parse_snapshot(document, "snapshot.json", policy_schemas=policy_schemas)
        parse.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Gateway(config, MemoryCounters(), GatewayMetrics(), {}, AccessLog())
        validate_build.append(time.perf_counter() - t0)
    total = [a + b for a, b in zip(parse, validate_build, strict=True)]
    return {
        "json_loads_s": _median(floor),
        "parse_validate_s": _median(parse),
        "build_s": _median(validate_build),
        "apply_s": _median(total),
        "apply_vs_json_loads": _median(total) / _median(floor),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", help="Store to seed (default: a temporary SQLite)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--apps-per-product", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="Print the results as JSON")
    parser.add_argument(
        "--live",
        action="store_true",
        help="Also measure the swap under load: real control plane, gateway and upstream",
    )
    live.add_arguments(parser)
    args = parser.parse_args()
    size = Size(products=args.products, apps_per_product=args.apps_per_product)
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        url = args.database_url or f"sqlite:///{tmp}/control.db"
        # With --live the backends point at the echo upstream that live.py starts.
        echo_port = live.free_port() if args.live else 9001
        timings = seed(url, size, backend=f"http://127.0.0.1:{echo_port}")
        compiled, document = measure_compile(url, args.rounds)
        applied = measure_apply(document, args.rounds)
        swapped = None
        if args.live:
            try:
                swapped = live.measure(url, echo_port, args, Path(tmp))
            except live.BenchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"Python {platform.python_version()}",
        "store": url.split(":", 1)[0],
        "model": {
            "products": size.products,
            "plans": size.products * size.plans_per_product,
            "applications": size.products * size.apps_per_product,
            "keys": size.products * size.apps_per_product * size.keys_per_app,
        },
        **timings,
        "compile": compiled,
        "apply": applied,
    }
    if swapped is not None:
        results["live"] = asdict(swapped)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    m = results["model"]
    print(
        f"model: {m['products']} products, {m['plans']} plans, {m['applications']} "
        f"applications, {m['keys']} keys on {results['store']} (seeded in "
        f"{timings['seed_seconds']:.1f} s)"
    )
    c = compiled
    print(
        f"compile: {c['compile_s']:.2f} s + serialize {c['serialize_s']:.2f} s = "
        f"{c['total_s']:.2f} s (target < {COMPILE_TARGET_S} s); snapshot "
        f"{c['size_bytes'] / 1e6:.1f} MB, {c['gzip_bytes'] / 1e6:.1f} MB gzipped"
    )
    a = applied
    print(
        f"gateway apply: parse+validate {a['parse_validate_s']:.2f} s + build "
        f"{a['build_s']:.2f} s = {a['apply_s']:.2f} s (target < {APPLY_TARGET_S} s); "
        f"{a['apply_vs_json_loads']:.1f}x json.loads alone ({a['json_loads_s']:.2f} s)"
    )
    if c["errors"]:
        print("compile errors:", *c["errors"], sep="\n  ")
    if swapped is not None:
        print()
        print(live.markdown(swapped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
