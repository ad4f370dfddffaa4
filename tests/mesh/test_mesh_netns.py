"""Sidecars on two hosts: network namespaces joined by a veth pair, the caller's outbound
traffic captured by an iptables REDIRECT (as Istio does), HTTP and plain TCP.

Host A (10.77.0.1) runs the caller and its sidecar; host B (10.77.0.2) runs the services,
reachable only through B's sidecars. The caller dials the services' virtual IPs; A's
iptables sends those connections to its sidecar, which reads SO_ORIGINAL_DST.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mesh_support import metric

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)

A_IP, B_IP = "10.77.0.1", "10.77.0.2"
VIP_HTTP, VIP_TCP = "10.96.0.10", "10.96.0.20"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _ensure_iptables() -> None:
    """iptables from Debian's package, installed here when missing (as CI does)."""
    if shutil.which("iptables") is not None:
        return
    if shutil.which("apt-get") is not None:
        install = ["apt-get", "install", "-y", "-qq", "iptables"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(install, capture_output=True)
    if shutil.which("iptables") is None:
        if os.environ.get("MESHGATE_REQUIRE_SERVICES") == "1":
            pytest.fail("iptables is not installed and could not be installed")
        pytest.skip("iptables is not installed")


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    _ensure_iptables()
    tag = f"{os.getpid() % 100000}"
    a, b = f"mga{tag}", f"mgb{tag}"
    va, vb = f"va{tag}", f"vb{tag}"
    try:
        _run("ip", "netns", "add", a)
        _run("ip", "netns", "add", b)
        _run("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        _run("ip", "link", "set", va, "netns", a)
        _run("ip", "link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, A_IP), (b, vb, B_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # The virtual IPs route out of A (as a ClusterIP range would) and are captured.
        _run("ip", "-n", a, "route", "add", "10.96.0.0/16", "dev", va)
        _run(
            "ip",
            "netns",
            "exec",
            a,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.96.0.0/16",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        )
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def _spawn(ns: str, args: list[str], workdir: Path, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *args],
        stdout=open(workdir / f"{name}.out", "wb"),
        stderr=open(workdir / f"{name}.err", "wb"),
        cwd=workdir,
    )


def _in_ns(ns: str, code: str, timeout: float = 60) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        timeout=timeout,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _wait(
    ns: str, host: str, port: int, proc: subprocess.Popen[bytes], workdir: Path, name: str
) -> None:
    code = (
        "import socket,time,sys\n"
        "deadline=time.time()+20\n"
        "while time.time()<deadline:\n"
        f"    try: socket.create_connection(({host!r},{port}),0.5).close(); sys.exit(0)\n"
        "    except OSError: time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    if subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code]).returncode != 0:
        err = (workdir / f"{name}.err").read_text(errors="replace")
        raise AssertionError(f"{name} never listened on {host}:{port} (exit {proc.poll()}):\n{err}")


TCP_ECHO = """
import asyncio, sys
async def handle(r, w):
    w.write(b"hello from " + sys.argv[2].encode() + b"\\n")
    while data := await r.read(65536):
        w.write(data.upper())
        await w.drain()
    w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def test_transparent_capture_across_hosts_http_and_tcp(
    hosts: tuple[str, str], tmp_path: Path
) -> None:
    a, b = hosts
    procs: list[subprocess.Popen[bytes]] = []
    (tmp_path / "tcp_echo.py").write_text(TCP_ECHO)
    try:
        # Host B: two payments instances (v1, v2) and a TCP "database", each behind a sidecar.
        backends = []
        for i, version in enumerate(("v1", "v2")):
            app_port, inbound = 9001 + i, 15006 + i
            procs.append(
                _spawn(
                    b,
                    [
                        "-m",
                        "meshgate.demo.service",
                        "--name",
                        "payments",
                        "--version",
                        version,
                        "--port",
                        str(app_port),
                        "--instance",
                        f"payments-{version}",
                    ],
                    tmp_path,
                    f"app-{version}",
                )
            )
            procs.append(
                _spawn(
                    b,
                    [
                        "-m",
                        "meshgate",
                        "sidecar",
                        "--service",
                        "payments",
                        "--version",
                        version,
                        "--app-port",
                        str(app_port),
                        "--inbound",
                        f"{B_IP}:{inbound}",
                        "--outbound",
                        f"127.0.0.1:{15101 + i}",
                        "--admin",
                        f"127.0.0.1:{15201 + i}",
                        "--config",
                        str(tmp_path / "empty.yaml"),
                    ],
                    tmp_path,
                    f"sidecar-b-{version}",
                )
            )
            backends.append(inbound)
        (tmp_path / "empty.yaml").write_text("services: []\n")
        procs.append(_spawn(b, [str(tmp_path / "tcp_echo.py"), "5432", "db-1"], tmp_path, "db"))
        db_config = tmp_path / "db.yaml"
        db_config.write_text(
            yaml.safe_dump(
                {
                    "sidecar": {
                        "service": "db",
                        "app_port": 5432,
                        "app_protocol": "tcp",
                        "inbound": f"{B_IP}:15010",
                        "outbound": None,
                        "admin": "127.0.0.1:15210",
                    }
                }
            )
        )
        procs.append(
            _spawn(
                b, ["-m", "meshgate", "sidecar", "--config", str(db_config)], tmp_path, "sidecar-db"
            )
        )
        _wait(b, B_IP, 15006, procs[1], tmp_path, "sidecar-b-v1")
        _wait(b, B_IP, 15007, procs[3], tmp_path, "sidecar-b-v2")
        _wait(b, B_IP, 15010, procs[-1], tmp_path, "sidecar-db")
        # Host A: the caller's sidecar, capturing the virtual IPs.
        mesh = {
            "services": [
                {
                    "name": "payments",
                    "virtual_ip": VIP_HTTP,
                    "port": 80,
                    "instances": [
                        {"address": B_IP, "port": 15006, "version": "v1"},
                        {"address": B_IP, "port": 15007, "version": "v2"},
                    ],
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ],
                    "routes": [
                        {
                            "match": [{"headers": {"x-beta": {"exact": "1"}}}],
                            "destinations": [{"subset": "v2"}],
                        },
                        {
                            "destinations": [
                                {"subset": "v1", "weight": 90},
                                {"subset": "v2", "weight": 10},
                            ]
                        },
                    ],
                },
                {
                    "name": "db",
                    "protocol": "tcp",
                    "virtual_ip": VIP_TCP,
                    "port": 5432,
                    "instances": [{"address": B_IP, "port": 15010}],
                },
            ],
            "sidecar": {
                "service": "orders",
                "app_port": 8000,
                "outbound": "127.0.0.1:15001",
                "inbound": f"{A_IP}:15006",
                "admin": "127.0.0.1:15000",
            },
        }
        a_config = tmp_path / "a.yaml"
        a_config.write_text(yaml.safe_dump(mesh))
        procs.append(
            _spawn(
                a, ["-m", "meshgate", "sidecar", "--config", str(a_config)], tmp_path, "sidecar-a"
            )
        )
        _wait(a, "127.0.0.1", 15001, procs[-1], tmp_path, "sidecar-a")
        # The caller knows only the virtual IP; iptables hands its connection to the sidecar.
        out = _in_ns(
            a,
            "import httpx, json, collections\n"
            f"c = httpx.Client(base_url='http://{VIP_HTTP}', timeout=10)\n"
            "by = lambda r: r.headers['x-served-by']\n"
            "seen = collections.Counter(by(c.get('/charge')) for _ in range(2000))\n"
            "beta = {by(c.get('/charge', headers={'x-beta': '1'})) for _ in range(20)}\n"
            "doc = c.get('/charge').json()\n"
            "print(json.dumps({'seen': seen, 'beta': sorted(beta), 'source': doc['source']}))\n",
        )
        result = json.loads(out)
        assert result["beta"] == ["payments-v2"]
        assert result["source"] == "orders/unknown"
        share = result["seen"].get("payments-v2", 0) / 2000
        assert 0.07 <= share <= 0.13, result["seen"]
        # Plain TCP: the same capture, relayed as bytes to the database behind its sidecar.
        out = _in_ns(
            a,
            "import socket\n"
            f"s = socket.create_connection(({VIP_TCP!r}, 5432), 5)\n"
            "greeting = s.recv(100)\n"
            "s.sendall(b'select 1')\n"
            "s.shutdown(socket.SHUT_WR)\n"
            "rest = b''\n"
            "while chunk := s.recv(100): rest += chunk\n"
            "print((greeting + rest).decode())\n",
        )
        assert out.strip().splitlines() == ["hello from db-1", "SELECT 1"]
        code = "import httpx; print(httpx.get('http://127.0.0.1:15000/metrics').text)"
        deadline = time.monotonic() + 5
        while True:
            metrics = _in_ns(a, code)
            closed = metric(metrics, "istio_tcp_connections_closed_total", destination_service="db")
            if closed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert metric(metrics, "istio_tcp_connections_opened_total", destination_service="db") == 1
        assert closed == 1
        assert metric(metrics, "istio_tcp_received_bytes_total", destination_service="db") == 8
        assert metric(metrics, "istio_tcp_sent_bytes_total", destination_service="db") == 24
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_mutual_tls_strict_across_hosts(hosts: tuple[str, str], tmp_path: Path) -> None:
    """A caller on host A reaches a strict service on host B over mutual TLS: its sidecar
    learns from the control plane (on B) that B's instance speaks it; plaintext from A to
    B's inbound port is refused."""
    from mtls_support import TestCa, spiffe

    a, b = hosts
    ca = TestCa()
    token = "netns-mtls-admin-token-0123456789"
    cp_url = f"http://{B_IP}:18000"
    procs: list[subprocess.Popen[bytes]] = []

    def sidecar(ns: str, service: str, app_port: int, inbound: str, n: int) -> None:
        files = ca.write(tmp_path / service, spiffe(service))
        args = ["-m", "meshgate", "sidecar", "--service", service, "--app-port", str(app_port)]
        args += ["--inbound", inbound, "--outbound", f"127.0.0.1:{15101 + n}"]
        args += ["--admin", f"127.0.0.1:{15201 + n}", "--control-plane", cp_url]
        args += ["--token", token, *files.flags]
        procs.append(_spawn(ns, args, tmp_path, f"sidecar-{service}"))

    try:
        control = ["-m", "meshgate", "control", "--listen", f"{B_IP}:18000"]
        control += ["--database-url", f"sqlite:///{tmp_path / 'cp.db'}", "--admin-token", token]
        procs.append(_spawn(b, control, tmp_path, "control"))
        _wait(b, B_IP, 18000, procs[-1], tmp_path, "control")
        _in_ns(
            b,
            "import httpx\n"
            f"c = httpx.Client(base_url='{cp_url}/admin/api/mesh', "
            f"headers={{'Authorization': 'Bearer {token}'}}, timeout=10)\n"
            "r = c.put('/services/payments', json={'name': 'payments', "
            "'mtls': {'mode': 'strict'}})\n"
            "assert r.status_code in (200, 201), r.text\n"
            "assert c.post('/promote').status_code in (200, 201)\n",
        )
        demo = ["-m", "meshgate.demo.service", "--name", "payments", "--port", "9001"]
        procs.append(_spawn(b, demo, tmp_path, "app-payments"))
        sidecar(b, "payments", 9001, f"{B_IP}:15006", 0)
        procs.append(_spawn(a, ["-m", "http.server", "8000", "-b", "127.0.0.1"], tmp_path, "app-a"))
        sidecar(a, "orders", 8000, f"{A_IP}:15006", 1)
        _wait(b, B_IP, 15006, procs[-3], tmp_path, "sidecar-payments")
        _wait(a, "127.0.0.1", 15102, procs[-1], tmp_path, "sidecar-orders")
        out = _in_ns(
            a,
            "import httpx, json, time, socket\n"
            "c = httpx.Client(proxy='http://127.0.0.1:15102', timeout=10)\n"
            "deadline = time.time() + 20\n"
            "while True:\n"
            "    r = c.get('http://payments/charge')\n"
            "    if r.status_code == 200 or time.time() > deadline: break\n"
            "    time.sleep(0.1)\n"
            "s = socket.create_connection(('10.77.0.2', 15006), 5)\n"
            "s.sendall(b'GET / HTTP/1.1\\r\\nHost: payments\\r\\n\\r\\n')\n"
            "plain = b''\n"
            "while chunk := s.recv(65536): plain += chunk\n"
            "m = httpx.get('http://127.0.0.1:15202/metrics').text\n"
            "print(json.dumps({'status': r.status_code, 'body': r.text, "
            "'plain': plain.decode(), 'metrics': m}))\n",
        )
        result = json.loads(out)
        assert result["status"] == 200, result["body"]
        assert json.loads(result["body"])["source"] == "orders/unknown"
        assert result["plain"].startswith("HTTP/1.1 403"), result["plain"][:300]
        assert "mutual TLS required" in result["plain"]
        assert metric(
            result["metrics"],
            "istio_requests_total",
            destination_service="payments",
            response_code="200",
            connection_security_policy="mutual_tls",
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
