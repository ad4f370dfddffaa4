"""The mesh demo of ``meshgate up``: two services, two instances each, each behind a sidecar.

``orders`` (two v1 instances) calls ``payments`` (a v1 and a v2 instance) through its
sidecar; every sidecar registers with the control plane and takes the mesh configuration
from it. The control plane is seeded once with a route that splits payments 90/10
between v1 and v2, retries that land on another instance, and outlier detection quick
enough to watch. Every process is a real one, started as a user would start it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "INSTANCES",
    "PAYMENTS",
    "SHOP",
    "Instance",
    "MeshDemo",
    "bootstrap_token",
    "demo_ports",
    "start_mesh_demo",
]

# The payments service as the demo seeds it (staging, then promoted to production).
PAYMENTS = {
    "name": "payments",
    # Only its sidecars' peers, over mutual TLS with their CA-issued identities.
    "mtls": {"mode": "strict"},
    "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
    ],
    "routes": [
        {
            "name": "beta-testers",
            "match": [{"headers": {"x-beta": {"exact": "1"}}}],
            "destinations": [{"subset": "v2"}],
        },
        {
            "name": "canary",
            "destinations": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
            "retries": {"attempts": 2, "retry_on": ["connect-failure", "5xx"]},
        },
    ],
    # Only orders may call payments: the caller named by its certificate.
    "authorization": [
        {
            "name": "orders-only",
            "action": "allow",
            "rules": [
                {"from": {"principals": ["spiffe://meshgate.local/ns/production/sa/orders"]}}
            ],
        }
    ],
    "policy": {
        "outlier_detection": {
            "consecutive_5xx": 3,
            "interval": 5,
            "base_ejection_time": 15,
            "max_ejection_percent": 50,
        }
    },
}


# An API product whose backend is the mesh: the gateway calls orders' sidecar over mutual TLS
# with its own workload identity, and the consumer token it signs rides along.
SHOP = """\
products:
  - name: shop
    path_prefix: /shop
    backend: https://127.0.0.1:15006
    upstream_tls: {mesh_service: orders}
    auth: {type: api_key, header: X-API-Key}
    plans:
      - name: gold
        limits: [{metric: hits, period: minute, value: 100}]
    applications:
      - {id: shop-app, plan: gold, keys: [k2]}
"""


@dataclass(frozen=True)
class Instance:
    service: str
    version: str
    app_port: int
    inbound: int
    outbound: int
    admin: int

    @property
    def name(self) -> str:
        return f"{self.service}-{self.version}-{self.app_port}"


INSTANCES = (
    Instance("orders", "v1", 9101, 15006, 15001, 15000),
    Instance("orders", "v1", 9102, 15016, 15011, 15010),
    Instance("payments", "v1", 9201, 15026, 15021, 15020),
    Instance("payments", "v2", 9202, 15036, 15031, 15030),
)


class MeshDemo:
    def __init__(self, processes: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
        self.processes = processes
        self.log_dir = log_dir

    def usage(self, gateway: str | None = None) -> list[str]:
        first, payments = INSTANCES[0], INSTANCES[2]
        shop = (
            [
                f"  curl -s -H 'X-API-Key: k2' {gateway}/shop/call/payments/charge"
                "   # gateway -> orders -> payments, mutual TLS, the consumer carried"
            ]
            if gateway
            else []
        )
        return [
            "  mesh           orders (2 instances) and payments (v1, v2), each behind a sidecar;"
            f" logs in {self.log_dir}",
            f"  curl -s -x http://127.0.0.1:{first.outbound} http://payments/charge"
            "   # as orders calls payments: 90 % v1, 10 % v2",
            f"  curl -s http://127.0.0.1:{first.app_port}/call/payments/charge"
            "   # the orders app itself, through its sidecar",
            f"  curl -s http://127.0.0.1:{first.admin}/clusters"
            "   # what that sidecar knows of each instance",
            f"  curl -s -x http://127.0.0.1:{payments.outbound} http://payments/charge"
            "   # 403: only orders may call payments (policy orders-only)",
            *shop,
        ]

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def demo_ports() -> list[int]:
    """Every port the demo listens on."""
    return [port for i in INSTANCES for port in (i.app_port, i.inbound, i.outbound, i.admin)]


def _seed(base: str, token: str) -> None:
    """Put the demo's payments configuration in staging and promote it, on the first start."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method: str, path: str, body: object | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{base}/admin/api{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    if call("GET", "/mesh/services/payments") == 200:
        return
    status = call("PUT", "/mesh/services/payments", PAYMENTS)
    if status not in (200, 201):
        raise RuntimeError(f"the control plane refused the demo's mesh configuration ({status})")
    call("POST", "/mesh/promote", {})
    # The shop product, beside what the gateway file seeded (prune=false keeps that).
    request = urllib.request.Request(
        f"{base}/admin/api/declarative?prune=false",
        data=SHOP.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{base}/admin/api/products?per_page=500",
                headers={"Authorization": f"Bearer {token}"},
            ),
            timeout=10,
        ) as response:
            products = json.loads(response.read())["items"]
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(f"the control plane refused the demo's shop product: {exc}") from None
    for product in products:
        if product["name"] == "shop":
            call("POST", f"/products/{product['id']}/promote", {})


def bootstrap_token(base: str, token: str, service: str) -> str:
    """A bootstrap token for ``service``'s workload certificates (production), good for a
    day and for every instance started with it: a demo's instances start together."""
    request = urllib.request.Request(
        f"{base}/admin/api/mesh/bootstrap-tokens",
        data=json.dumps({"service": service, "env": "production", "expires_in": 86400}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["token"])
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeError(
            f"the control plane gave no bootstrap token for {service}: {exc}"
        ) from None


def start_mesh_demo(
    base: str, token: str, log_dir: Path, tracing: list[str] | None = None
) -> MeshDemo:
    """Seed the control plane, then start every instance's app and sidecar, each sidecar
    with a workload identity from the control plane's CA."""
    _seed(base, token)
    identities = {i.service: bootstrap_token(base, token, i.service) for i in INSTANCES}
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    demo = MeshDemo(processes, log_dir)
    try:
        for i in INSTANCES:
            out = open(log_dir / f"{i.name}.log", "ab")
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "meshgate.demo.service",
                        "--name",
                        i.service,
                        "--version",
                        i.version,
                        "--port",
                        str(i.app_port),
                        "--proxy",
                        f"127.0.0.1:{i.outbound}",
                    ],  # fmt: skip
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            )
            sidecar_log = open(log_dir / f"{i.name}-sidecar.log", "ab")
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "meshgate",
                        "sidecar",
                        "--service",
                        i.service,
                        "--version",
                        i.version,
                        "--app-port",
                        str(i.app_port),
                        "--inbound",
                        f"127.0.0.1:{i.inbound}",
                        "--outbound",
                        f"127.0.0.1:{i.outbound}",
                        "--admin",
                        f"127.0.0.1:{i.admin}",
                        "--control-plane",
                        base,
                        # A demo stops at once: no callers outside it to wait for.
                        "--drain-seconds",
                        "0.5",
                        *(tracing or []),
                    ],  # fmt: skip
                    stdout=subprocess.DEVNULL,
                    stderr=sidecar_log,
                    start_new_session=True,
                    env={
                        **os.environ,
                        "MESHGATE_CONTROL_PLANE_TOKEN": token,
                        "MESHGATE_BOOTSTRAP_TOKEN": identities[i.service],
                    },
                )
            )
        _wait_ready(demo)
    except BaseException:
        demo.stop()
        raise
    return demo


def _wait_ready(demo: MeshDemo, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for i in INSTANCES:
        while True:
            for p in demo.processes:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"a mesh demo process exited ({p.returncode}); see {demo.log_dir}"
                    )
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{i.admin}/readyz", timeout=1
                ) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar of {i.name} was not ready within {timeout}s")
            time.sleep(0.1)
    # Ready instances reach the callers through the registry's stream: wait until the
    # first orders sidecar (the one the walkthrough calls through) knows both payments.
    admin = INSTANCES[0].admin
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=1) as r:
                if len(json.load(r).get("payments", [])) == 2:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the orders sidecar did not learn of payments within {timeout}s")
        time.sleep(0.05)
