#!/usr/bin/env python3
"""The gateway's CPU per request with the consumer token on, against off, in one run.

A gateway from a file (the example product, its ``hits`` minute limit raised so nothing is
refused, in-memory counters, access log off) with a workload identity from files made here
(a P-256 test root issuing ``spiffe://meshgate.local/ns/production/sa/meshgate-gateway``)
serves ``wrk -t1 -c50 -d10s`` of ``GET /echo/hello`` with a key, in front of ``meshgate
echo``. Two variants, alternating, the best of ``--repeat`` kept: ``consumer_token: {enabled:
true}`` (each request carries ``x-meshgate-consumer``: the cached token, signed again at
half its life) and ``enabled: false`` (the same identity loaded, no token). The gateway has
core 1 to itself; wrk and the upstream share core 0. Reported per variant: requests/s and
the gateway process's CPU microseconds per request (utime+stime from /proc over the run,
divided by the requests completed); the ratio is on against off. The target: within 10 %.

Not a pass/fail test. Needs Debian's ``wrk``.
``python bench/gateway/consumer_token.py [--repeat 3] [--seconds 10] [--ttl 60]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from _procs import cpu_per_request, free_port, spawn, wait_ok
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GATEWAY_ID = "spiffe://meshgate.local/ns/production/sa/meshgate-gateway"


def _identity(workdir: Path) -> dict[str, str]:
    """A test root and the gateway's X.509-SVID under it, as ``identity:`` files."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(GATEWAY_ID)]),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    files = {
        "cert": leaf.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "bundle": root.public_bytes(serialization.Encoding.PEM),
    }
    out = {}
    for part, data in files.items():
        path = workdir / f"gateway-{part}.pem"
        path.write_bytes(data)
        out[part] = str(path)
    return out


def _config(
    port: int, admin: int, upstream: int, identity: dict[str, str], token: bool, ttl: float
) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "access_log": False,
        "limits": {"backend": "memory"},
        "identity": identity,
        "consumer_token": {"enabled": token, "ttl": ttl},
        "products": [
            {
                "name": "echo",
                "path_prefix": "/echo",
                "backend": f"http://127.0.0.1:{upstream}",
                "auth": {"type": "api_key", "header": "X-API-Key"},
                "plans": [
                    {
                        "name": "basic",
                        "limits": [{"metric": "hits", "period": "minute", "value": 10**9}],
                    }
                ],
                "applications": [
                    {
                        "id": "app1",
                        "plan": "basic",
                        "keys": ["k1"],
                        "name": "App One",
                        "account": "acme",
                    }
                ],
            }
        ],
    }


def _run_variant(
    workdir: Path, upstream: int, identity: dict[str, str], token: bool, seconds: int, ttl: float
) -> dict[str, Any]:
    port, admin = free_port(), free_port()
    path = workdir / "gw.yaml"
    path.write_text(yaml.safe_dump(_config(port, admin, upstream, identity, token, ttl)))
    gw = spawn(["gateway", "--config", str(path), "--no-watch"], "1", workdir, f"gw-{token}")
    try:
        url = f"http://127.0.0.1:{port}/echo/hello"
        r = wait_ok(url, headers={"X-API-Key": "k1"})
        carried = "x-meshgate-consumer" in r.text
        if carried != token:
            raise SystemExit(f"the upstream {'did not see' if token else 'saw'} the token")
        return cpu_per_request(gw.pid, url, seconds)
    finally:
        gw.terminate()
        gw.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=60, help="consumer_token.ttl, seconds")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        identity = _identity(workdir)
        upstream = free_port()
        echo = spawn(["echo", f"127.0.0.1:{upstream}"], "0", workdir, "echo")
        try:
            best: dict[bool, dict[str, Any]] = {}
            for _ in range(args.repeat):
                for token in (False, True):
                    result = _run_variant(
                        workdir, upstream, identity, token, args.seconds, args.ttl
                    )
                    kept = best.get(token)
                    if kept is None or result["cpu_us_per_request"] < kept["cpu_us_per_request"]:
                        best[token] = result
        finally:
            echo.terminate()
            echo.wait(30)
    off, on = best[False], best[True]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "seconds": args.seconds,
        "repeat": args.repeat,
        "token_off": off,
        "token_on": on,
        "cpu_ratio_on_vs_off": round(on["cpu_us_per_request"] / off["cpu_us_per_request"], 3),
    }
    print(f"{'variant':<10} {'req/s':>8} {'CPU µs/req':>11} {'non-2xx':>8}")
    for name, row in (("token off", off), ("token on", on)):
        print(f"{name:<10} {row['rps']:>8} {row['cpu_us_per_request']:>11} {row['non_2xx']:>8}")
    print(f"CPU per request, on / off: {report['cpu_ratio_on_vs_off']} (target: at most 1.10)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
