"""Mutual TLS between sidecars, with real certificates from a test CA and real processes:
per-service modes on one inbound port, callers' certificates refused for what is wrong with
them, the caller's check of the instance it reached, and a rotation under load (SIGHUP).

One control plane, one app and the sidecars in front of it serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import within
from mesh_support import (
    ControlPlaneProc,
    SidecarProc,
    attached_sidecar,
    metric,
    start_app,
    start_control_plane,
)
from mtls_support import Files, TestCa, refused, spiffe, tls_call

from meshgate.config import ConfigError
from meshgate.config.mesh import parse_mesh

MODES = {"pay-strict": "strict", "pay-perm": "permissive", "pay-off": "disable"}
# Called over HTTP/2 (ALPN h2 inside mutual TLS); its app speaks HTTP/1.1.
H2 = "pay-h2"


class Mesh:
    def __init__(self, workdir: Path, ca: TestCa, cp: ControlPlaneProc) -> None:
        self.workdir = workdir
        self.ca = ca
        self.cp = cp
        self.sidecars: dict[str, SidecarProc] = {}
        self.files: dict[str, Files] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("mtls")
    ca = TestCa()
    cp = start_control_plane(workdir)
    procs: list[Any] = []
    try:
        for name, mode in MODES.items():
            cp.put_service({"name": name, "mtls": {"mode": mode}}, promote=False)
        cp.put_service({"name": H2, "protocol": "http2", "mtls": {"mode": "strict"}}, promote=False)
        r = cp.api.post("/mesh/promote")
        assert r.status_code in (200, 201), r.text
        app = start_app(workdir, "payments")
        procs.append(app)
        m = Mesh(workdir, ca, cp)
        for name in ("orders", *MODES, H2):
            files = m.files[name] = ca.write(workdir / name, spiffe(name))
            flags = [*files.flags, "--edge-interval", "0.5", "--drain-seconds", "2"]
            sidecar = attached_sidecar(workdir, cp, name, app.port, *flags, wait_ready=False)
            procs.append(sidecar)
            m.sidecars[name] = sidecar
        for sidecar in m.sidecars.values():
            sidecar.wait_ready()
        with m.sidecars["orders"].client() as client:
            # Every instance is known to the caller, as speaking mutual TLS.
            names = [*MODES, H2]
            within(10, lambda: all(_ok(client, f"http://{n}/") for n in names), "all reached")
        yield m
    finally:
        for p in procs[1:]:  # the sidecars drain at once, then the app stops
            if p.proc.popen.poll() is None:
                p.proc.popen.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            p.proc.stop()
        cp.stop()


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _plain(port: int, extra: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: svc\r\n" + extra + b"\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_the_caller_sidecar_speaks_mutual_tls_where_the_mode_allows(mesh: Mesh) -> None:
    caller = mesh.sidecars["orders"]
    with caller.client() as client:
        for name in (*MODES, H2):
            r = client.get(f"http://{name}/hello")
            assert r.status_code == 200, r.text
            # The app is told who called, as the caller's certificate names it.
            assert r.json()["source"] == "orders/unknown"
    out = caller.metrics()
    for name, policy in (
        ("pay-strict", "mutual_tls"),
        ("pay-perm", "mutual_tls"),
        (H2, "mutual_tls"),
    ):
        assert metric(
            out,
            "istio_requests_total",
            reporter="source",
            destination_service=name,
            connection_security_policy=policy,
        )
    # disable: plaintext, though the instance could speak mutual TLS.
    assert metric(
        out,
        "istio_requests_total",
        destination_service="pay-off",
        connection_security_policy="none",
    )
    assert not metric(
        out,
        "istio_requests_total",
        destination_service="pay-off",
        connection_security_policy="mutual_tls",
    )
    assert metric(out, "meshgate_mesh_mtls_handshakes_total", direction="outbound") >= 2
    strict = mesh.sidecars["pay-strict"].metrics()
    assert metric(
        strict,
        "istio_requests_total",
        reporter="destination",
        source_workload="orders",
        connection_security_policy="mutual_tls",
    )
    # The registry knows which instances speak mutual TLS.
    instances = mesh.cp.instances("pay-strict")
    assert [i["mtls"] for i in instances] == [True]

    # The service graph tells the hops over mutual TLS from the others.
    def edges() -> dict[str, str]:
        r = mesh.cp.api.get("/mesh/graph", params={"env": "production", "window": 600})
        assert r.status_code == 200, r.text
        return {e["destination"]: e["mtls"] for e in r.json()["edges"] if e["source"] == "orders"}

    within(5, lambda: {"pay-strict", "pay-off", H2} <= set(edges()), "the calls in the graph")
    graph = edges()
    assert graph["pay-strict"] == graph[H2] == "all" and graph["pay-off"] == "none"


def test_plaintext_is_refused_by_strict_taken_by_permissive_and_disable(mesh: Mesh) -> None:
    strict = mesh.sidecars["pay-strict"]
    answer = _plain(strict.inbound)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403"), answer[:300]
    assert b"application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    assert "mutual TLS required" in json.loads(body)["detail"]
    for name in ("pay-perm", "pay-off"):
        answer = _plain(mesh.sidecars[name].inbound, b"Connection: close\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    out = strict.metrics()
    assert metric(out, "meshgate_mesh_mtls_failures_total", reason="plaintext") >= 1
    perm = mesh.sidecars["pay-perm"].metrics()
    assert metric(
        perm, "meshgate_mesh_inbound_connections_total", connection_security_policy="none"
    )


def test_a_tls_caller_is_named_by_its_certificate_not_by_a_header(mesh: Mesh) -> None:
    files = mesh.files["orders"]
    request = (
        b"GET /x HTTP/1.1\r\nHost: pay-perm\r\nConnection: close\r\n"
        b"x-meshgate-source: admin/v9\r\n\r\n"
    )
    for name in ("pay-strict", "pay-perm"):
        server, answer = tls_call(mesh.sidecars[name].inbound, files.bundle, files, request)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["source"] == "orders/unknown"
        san = server.extensions.get_extension_for_class(
            __import__("cryptography").x509.SubjectAlternativeName
        )
        assert [u.value for u in san.value] == [spiffe(name)]
    out = mesh.sidecars["pay-perm"].metrics()
    assert metric(out, "istio_requests_total", reporter="destination", source_workload="orders")
    assert not metric(out, "istio_requests_total", source_workload="admin")
    # disable: a TLS caller is not served.
    assert refused(mesh.sidecars["pay-off"].inbound, files.bundle, files)


def test_callers_with_a_wrong_certificate_are_refused(mesh: Mesh) -> None:
    ca, workdir = mesh.ca, mesh.workdir
    port = mesh.sidecars["pay-strict"].inbound
    bundle = mesh.files["orders"].bundle
    other_ca = TestCa("another mesh's root")
    cases = {
        "expired": ca.write(workdir / "expired", spiffe("orders"), expired=True),
        "untrusted": other_ca.write(workdir / "foreign", spiffe("orders")),
        "trust-domain": ca.write(workdir / "domain", spiffe("orders", domain="evil.example")),
        "environment": ca.write(workdir / "staging", spiffe("orders", env="staging")),
        "no-spiffe-id": ca.write(workdir / "dns", None, dns="orders.example"),
    }
    for reason, files in cases.items():
        assert refused(port, bundle, files), reason
    assert refused(port, bundle, None)  # no certificate at all
    # The right one still passes.
    assert not refused(port, bundle, mesh.files["orders"])
    out = mesh.sidecars["pay-strict"].metrics()
    for reason in (*cases, "no-certificate"):
        assert metric(out, "meshgate_mesh_mtls_failures_total", reason=reason) >= 1, reason


class _Impostor(threading.Thread):
    """A TLS server that answers with another service's certificate."""

    def __init__(self, files: Files) -> None:
        super().__init__(daemon=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(files.chain), str(files.key))
        ctx.load_verify_locations(cafile=str(files.bundle))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    if tls.recv(65536):
                        self.served += 1
                        tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except OSError:
                pass


def test_an_instance_answering_as_another_service_is_a_connect_failure(mesh: Mesh) -> None:
    # A workload of the mesh (pay-perm's certificate) registers as an instance of "ledger".
    impostor = _Impostor(mesh.files["pay-perm"])
    impostor.start()
    try:
        r = httpx.post(
            f"{mesh.cp.url}/dp/v1/mesh/instances",
            headers={"Authorization": f"Bearer {mesh.cp.token}"},
            json={
                "env": "production",
                "service": "ledger",
                "address": "127.0.0.1",
                "port": impostor.port,
                "mtls": True,
            },
            timeout=5,
        )
        assert r.status_code == 201, r.text
        caller = mesh.sidecars["orders"]
        with caller.client() as client:
            within(5, lambda: "ledger" in caller.clusters(), "ledger known")
            r = client.get("http://ledger/")
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert spiffe("pay-perm") in detail and spiffe("ledger") in detail
        assert impostor.served == 0  # no request was sent to it
        out = caller.metrics()
        assert metric(
            out,
            "istio_requests_total",
            destination_service="ledger",
            response_code="503",
            response_flags="URX",
        )
        # A connect failure: retried (Istio's default retry_on) until the retries are spent,
        # each attempt refused.
        assert metric(out, "meshgate_mesh_mtls_failures_total", reason="peer-identity") >= 3
        # Logged once, with both identities, however often it happens.
        with caller.client() as client:
            assert client.get("http://ledger/").status_code == 503
        lines = [x for x in caller.proc.stderr().splitlines() if "answered as" in x]
        assert len(lines) == 1 and spiffe("pay-perm") in lines[0] and spiffe("ledger") in lines[0]
    finally:
        impostor.sock.close()


def test_rotation_under_load_fails_no_request(mesh: Mesh) -> None:
    caller, callee = mesh.sidecars["orders"], mesh.sidecars["pay-perm"]
    files = mesh.files["pay-perm"]
    old_serial = files.serial
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                r = await client.get("http://pay-perm/load")
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            done += 1

    async def run() -> None:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(proxy=caller.proxy, timeout=15, limits=limits) as client:
            workers = [asyncio.create_task(worker(client)) for _ in range(300)]
            await asyncio.sleep(0.7)
            # A bad file first: refused, the running identity kept.
            files.chain.write_bytes(b"not a certificate")
            callee.proc.popen.send_signal(signal.SIGHUP)
            for _ in range(200):  # a busy callee may take a while to read it
                if "identity refused" in callee.proc.stderr():
                    break
                await asyncio.sleep(0.05)
            # Then both ends renewed (same CA, new keys), under load.
            new = mesh.ca.write(files.chain.parent, spiffe("pay-perm"))
            files.serial = new.serial
            callee.proc.popen.send_signal(signal.SIGHUP)
            orders = mesh.files["orders"]
            orders.serial = mesh.ca.write(orders.chain.parent, spiffe("orders")).serial
            caller.proc.popen.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)

    asyncio.run(run())
    assert failures == [], failures[:5]
    assert done > 300
    assert "identity refused" in callee.proc.stderr()

    # Connections made after the reload see the new certificate; the old one still verifies
    # nowhere it should not: it is simply no longer served.
    def served() -> int:
        server, answer = tls_call(callee.inbound, files.bundle, mesh.files["orders"])
        assert answer.startswith(b"HTTP/1.1 200")
        return int(server.serial_number)

    within(5, lambda: served() == files.serial != old_serial, "the new certificate served")
    config = httpx.get(f"{callee.admin_url}/config", timeout=5).json()
    assert config["mtls"] == {
        "mode": "permissive",
        "identity": spiffe("pay-perm"),
        "not_after": config["mtls"]["not_after"],
    }


def test_a_mirrored_copy_goes_over_mutual_tls_too(mesh: Mesh) -> None:
    route = {"mirror": {"service": "pay-strict"}, "destinations": [{}]}
    mesh.cp.put_service({"name": "pay-perm", "routes": [route]})
    strict = mesh.sidecars["pay-strict"]
    try:
        with mesh.sidecars["orders"].client() as client:

            def mirrored() -> bool:
                assert client.get("http://pay-perm/mirror-me").status_code == 200
                time.sleep(0.1)
                return any(e["path"] == "/mirror-me" for e in strict.access_log())

            within(10, mirrored, "a copy served by the strict service")
        copies = [e for e in strict.access_log() if e["path"] == "/mirror-me"]
        assert {e["status"] for e in copies} == {200}
        assert {e["authority"] for e in copies} == {"pay-strict-shadow"}
    finally:
        mesh.cp.put_service({"name": "pay-perm", "mtls": {"mode": "permissive"}})


def _sidecar_error(workdir: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "meshgate", "sidecar", "--service", "orders", "--app-port", "1",
         "--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--config", str(workdir / "empty.yaml"), *args],
        capture_output=True, text=True, timeout=30, cwd=workdir,
    )  # fmt: skip
    assert out.returncode != 0, out.stderr
    return out.stderr


def test_identity_files_that_cannot_serve_stop_the_sidecar_with_a_clear_error(
    mesh: Mesh, tmp_path: Path
) -> None:
    (tmp_path / "empty.yaml").write_text("services: []\n")
    wrong = mesh.ca.write(tmp_path / "wrong", spiffe("payments"))
    err = _sidecar_error(tmp_path, *wrong.flags)
    assert "names spiffe://meshgate.local/ns/production/sa/payments" in err
    assert "fronts service 'orders'" in err
    expired = mesh.ca.write(tmp_path / "expired", spiffe("orders"), expired=True)
    assert "expired" in _sidecar_error(tmp_path, *expired.flags)
    garbage = mesh.ca.write(tmp_path / "garbage", spiffe("orders"))
    garbage.key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    assert "private key" in _sidecar_error(tmp_path, *garbage.flags)
    err = _sidecar_error(tmp_path, "--identity-cert", str(wrong.chain))
    assert "identity_cert, identity_key and trust_bundle go together" in err
    missing = ["--identity-cert", "/nonexistent/c.pem", *wrong.flags[2:]]
    assert "cannot read /nonexistent/c.pem" in _sidecar_error(tmp_path, *missing)


def test_the_mode_is_checked_and_static_instances_never_speak_mtls() -> None:
    with pytest.raises(ConfigError, match="mtls.mode"):
        parse_mesh("services: [{name: a, mtls: {mode: on}}]")
    with pytest.raises(ConfigError, match="a static instance has no sidecar"):
        parse_mesh("services: [{name: a, instances: [{address: 10.0.0.1, port: 80, mtls: true}]}]")
    config = parse_mesh("services: [{name: a}]")
    assert config.services[0].mtls.mode == "permissive"


def test_a_sidecar_reads_instances_with_fields_it_does_not_know() -> None:
    from meshgate.config.mesh import Instance
    from meshgate.mesh._controlplane import _instance

    wire = {"id": "x", "address": "10.0.0.1", "port": 80, "mtls": True, "future": {"a": 1}}
    assert Instance.model_validate(_instance(wire)) == Instance(
        address="10.0.0.1", port=80, mtls=True
    )
