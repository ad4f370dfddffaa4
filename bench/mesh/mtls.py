"""The mutual TLS pairs of the mesh benchmark (``--mtls``): a meshgate sidecar pair that
speaks mutual TLS, and an HAProxy pair that does the same work with TLS (client
certificate presented and verified both ways, TLS 1.3).

The certificates come from a CA made here (``cryptography``, ECDSA P-256), the sidecars'
naming SPIFFE IDs. meshgate's sidecars learn from the control plane's registry that their
peer speaks mutual TLS, so the meshgate pair runs with a ``meshgate control`` beside it
(idle while measured: a heartbeat every few seconds); the service is ``strict``, so a
200 through the pair proves that the hop was mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gateway.run import BenchError, Server, free_port, progress
from bench.mesh.processes import Sidecar

TRUST_DOMAIN = "meshgate.local"
ADMIN_TOKEN = "mesh-bench-mtls-admin"

# HAProxy B terminates TLS with a client certificate required; A originates it with its
# own certificate and verifies B's against the CA. Kept alive and reused, as the plain pair.
HAPROXY_TLS_B = """\
global
  nbthread 1
  maxconn 4096
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend listener
  bind 127.0.0.1:{port} ssl crt {crt} ca-file {ca} verify required
  default_backend target
backend target
  server target 127.0.0.1:{target}
"""
HAPROXY_TLS_A = """\
global
  nbthread 1
  maxconn 4096
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend listener
  bind 127.0.0.1:{port}
  default_backend target
backend target
  server target 127.0.0.1:{target} ssl crt {crt} ca-file {ca} verify required
"""


class Pki:
    """A CA and the leaves of the benchmark, as PEM files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgate bench root")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._pem(self._cert))

    @staticmethod
    def _pem(cert: Any) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, uri: str) -> tuple[Path, Path, Path]:
        """A certificate naming ``uri``: its chain file, key file, and both in one (HAProxy)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain, key_file, both = (self.directory / f"{name}{s}" for s in (".crt", ".key", ".pem"))
        chain.write_bytes(self._pem(cert))
        key_file.write_bytes(key_pem)
        both.write_bytes(self._pem(cert) + key_pem)
        return chain, key_file, both


def _call(port: int, method: str, path: str, doc: object = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        body = json.dumps(doc).encode() if doc is not None else None
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"control plane: {method} {path} failed: {exc}") from None
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None


def start_haproxy_tls_pair(
    server_port: int, core: str, workdir: Path, track: Callable[[Server], Server]
) -> tuple[int, int, Server, Server]:
    """HAProxy B (TLS, client certificate required) in front of the server, HAProxy A
    (plain listener, TLS with its certificate to B): (A's port, B's port, A, B)."""
    pki = Pki(workdir / "haproxy-pki")
    _, _, b_pem = pki.leaf("haproxy-b", f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server")
    _, _, a_pem = pki.leaf("haproxy-a", f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client")
    port_a, port_b = free_port(), free_port()
    servers = []
    for name, template, port, target, pem in (
        ("haproxy-tls-b", HAPROXY_TLS_B, port_b, server_port, b_pem),
        ("haproxy-tls-a", HAPROXY_TLS_A, port_a, port_b, a_pem),
    ):
        conf = workdir / f"{name}.cfg"
        conf.write_text(template.format(port=port, target=target, crt=pem, ca=pki.ca))
        servers.append(track(Server(name, ["haproxy", "-db", "-f", str(conf)], core, workdir)))
    b, a = servers
    return port_a, port_b, a, b


def start_meshgate_mtls_pair(
    server_port: int, core: str, workdir: Path, track: Callable[[Server], Server]
) -> tuple[int, Sidecar, Sidecar]:
    """A control plane, then sidecar B (service ``server``, mode strict) and A (service
    ``client``, a local port for ``server``), each with its identity: (A's local port,
    A, B) once A lists B as speaking mutual TLS."""
    pki = Pki(workdir / "mesh-pki")
    port = free_port()
    command = [sys.executable, "-m", "meshgate", "control", "--listen", f"127.0.0.1:{port}"]
    command += ["--data-dir", str(workdir / "control-mtls"), "--admin-token", ADMIN_TOKEN]
    command += ["--log-level", "WARNING"]
    control = track(Server("control-plane-mtls", command, core, workdir))
    deadline = time.monotonic() + 30
    while True:
        control.check_alive()
        try:
            if _call(port, "GET", "/admin/api/tokens")[0] == 200:
                break
        except BenchError:
            pass
        if time.monotonic() > deadline:
            raise BenchError("the control plane does not answer")
        time.sleep(0.1)
    status, doc = _call(
        port,
        "PUT",
        "/admin/api/mesh/services/server",
        {"name": "server", "mtls": {"mode": "strict"}},
    )
    if status not in (200, 201):
        raise BenchError(f"cannot declare the service: HTTP {status}: {doc}")
    status, doc = _call(port, "POST", "/admin/api/mesh/promote")
    if status not in (200, 201):
        raise BenchError(f"cannot promote the mesh configuration: HTTP {status}: {doc}")
    cp = ["--control-plane", f"http://127.0.0.1:{port}", "--token", ADMIN_TOKEN]

    def identity(service: str) -> list[str]:
        chain, key, _ = pki.leaf(service, f"spiffe://{TRUST_DOMAIN}/ns/production/sa/{service}")
        return ["--identity-cert", str(chain), "--identity-key", str(key)] + [
            "--trust-bundle",
            str(pki.ca),
        ]

    callee = Sidecar(
        "sidecar-mtls-b",
        {"service": "server", "app_port": server_port},
        [],
        core,
        workdir,
        extra=[*cp, *identity("server")],
    )
    track(callee.server)
    callee.wait_ready()
    local = free_port()
    caller = Sidecar(
        "sidecar-mtls-a",
        {
            "service": "client",
            "app_port": server_port,
            "outbound": f"127.0.0.1:{free_port()}",
            "upstreams": [{"service": "server", "local_port": local}],
        },
        [],
        core,
        workdir,
        extra=[*cp, *identity("client")],
    )
    track(caller.server)
    caller.wait_ready()
    deadline = time.monotonic() + 20
    while not caller.endpoints("server"):
        if time.monotonic() > deadline:
            raise BenchError("the caller's sidecar never listed the server's instance")
        time.sleep(0.05)
    progress("meshgate-mtls-pair: the caller lists the server's instance (mutual TLS, strict)")
    return local, caller, callee
