"""TLS at the gateway's edge: certificates chosen by SNI, versions, reload under load, session
resumption, hostile handshakes, and client certificates as credentials (auth type mtls)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gateway_e2e_support import TIMEOUT, wait_for
from harness import echo_upstream, example_product, free_port, gateway_config, run_gateway
from tls_support import CertificateAuthority, client_ssl, handshake, served_name

ETERNAL = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 10**9}]}]


def tls_listener(ca: CertificateAuthority, **overrides: Any) -> dict[str, Any]:
    api = ca.issue("api", dns=("api.example.test",))
    other = ca.issue("other", dns=("other.example.test", "*.wild.example.test"))
    third = ca.issue("third", dns=("third.example.test",), cn="third")
    listener: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "certificates": [
            {"name": "api", "cert": str(api.cert), "key": str(api.key)},
            {"name": "other", "cert": str(other.cert), "key": str(other.key)},
            {"name": "third", "cert": str(third.cert), "key": str(third.key)},
        ],
    }
    listener.update(overrides)
    return listener


def tls_port(config: dict[str, Any]) -> int:
    return int(config["tls"]["listen"].rpartition(":")[2])


def test_sni_chooses_among_three_certificates_and_https_is_forwarded(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        product = example_product(upstream, plans=ETERNAL)
        config = gateway_config([product], tls=tls_listener(ca))
        with run_gateway(config, tmp_path) as gw:
            port = tls_port(config)
            assert served_name(port, "api.example.test", ca) == "api.example.test"
            assert served_name(port, "other.example.test", ca) == "other.example.test"
            assert served_name(port, "x.wild.example.test", ca) == "other.example.test"
            assert served_name(port, "third.example.test", ca) == "third"
            # No match, and no SNI at all: the first certificate.
            assert served_name(port, "unknown.example.test", ca) == "api.example.test"
            ctx = client_ssl(ca)
            ctx.check_hostname = False
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            with ctx.wrap_socket(raw) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert tls.selected_alpn_protocol() in (None, "http/1.1")
            with httpx.Client(verify=client_ssl(ca), timeout=TIMEOUT) as client:
                r = client.get(
                    f"https://127.0.0.1:{port}/echo/hi",
                    headers={"X-API-Key": "k1", "Host": "api.example.test"},
                    extensions={"sni_hostname": "api.example.test"},
                )
            assert r.status_code == 200, r.text
            seen = r.json()["headers"]
            assert seen["x-forwarded-proto"] == "https"
            # The cleartext listener still serves, as http.
            r = httpx.get(f"{gw.url}/echo/hi", headers={"X-API-Key": "k1"}, timeout=TIMEOUT)
            assert r.json()["headers"]["x-forwarded-proto"] == "http"


def test_a_product_names_the_certificate_for_its_hosts(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream, plans=ETERNAL, hosts=["shop.example.test"], certificate="third"
        )
        config = gateway_config([product], tls=tls_listener(ca))
        with run_gateway(config, tmp_path):
            assert served_name(tls_port(config), "shop.example.test", ca) == "third"


def test_a_product_naming_an_unknown_certificate_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    config = gateway_config(
        [example_product(9, certificate="nope")], tls=tls_listener(ca), admin_listen=None
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [sys.executable, "-m", "meshgate", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "names certificate 'nope'" in out.stdout + out.stderr


def test_only_tls_12_and_13_are_spoken(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config(
            [example_product(upstream)], tls=tls_listener(ca, min_version="1.3")
        )
        with run_gateway(config, tmp_path):
            port = tls_port(config)
            with pytest.raises(ssl.SSLError):
                handshake(port, "api.example.test", client_ssl(ca, maximum=ssl.TLSVersion.TLSv1_2))
            with handshake(port, "api.example.test", client_ssl(ca)) as tls:
                assert tls.version() == "TLSv1.3"
        config = gateway_config([example_product(upstream)], tls=tls_listener(ca))
        with run_gateway(config, tmp_path, name="gw12"):
            port = tls_port(config)
            ctx = client_ssl(ca, maximum=ssl.TLSVersion.TLSv1_2)
            with handshake(port, "api.example.test", ctx) as tls:
                assert tls.version() == "TLSv1.2"
                # Forward secrecy and AEAD only.
                name = tls.cipher()[0]
                assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.check_hostname = False
            old.verify_mode = ssl.CERT_NONE
            try:
                old.minimum_version = ssl.TLSVersion.TLSv1
                old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.set_ciphers("ALL:@SECLEVEL=0")
            except (ValueError, ssl.SSLError):
                pytest.skip("this OpenSSL cannot even offer TLS 1.1")
            with pytest.raises((ssl.SSLError, ConnectionError)):
                handshake(port, "api.example.test", old)


def test_sessions_resume(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)], tls=tls_listener(ca))
        with run_gateway(config, tmp_path):
            port = tls_port(config)
            ctx = client_ssl(ca, maximum=ssl.TLSVersion.TLSv1_2)
            with handshake(port, "api.example.test", ctx) as first:
                session = first.session
                assert not first.session_reused
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            with ctx.wrap_socket(raw, server_hostname="api.example.test", session=session) as again:
                assert again.session_reused


def test_hostile_handshakes_leave_the_gateway_serving(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config(
            [example_product(upstream, plans=ETERNAL)],
            tls=tls_listener(ca),
            timeouts={"client_header": 1},
        )
        with run_gateway(config, tmp_path):
            port = tls_port(config)
            # Cleartext HTTP to the TLS port: the handshake fails, the connection is closed.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
                plain.sendall(b"GET /echo/hi HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\n\r\n")
                plain.settimeout(5)
                data = b""
                try:
                    while chunk := plain.recv(4096):
                        data += chunk
                except ConnectionResetError:
                    pass
                assert b"200" not in data
            # A handshake that never starts, and one that stops midway: freed after the
            # header timeout.
            stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
            half = socket.create_connection(("127.0.0.1", port), timeout=5)
            half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            started = time.monotonic()
            for sock in (stalled, half):
                sock.settimeout(5)
                try:
                    assert sock.recv(4096) in (b"",) or True
                    while sock.recv(4096):
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
                sock.close()
            assert time.monotonic() - started < 4.5
            # Garbage that is not TLS at all.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as junk:
                junk.sendall(os.urandom(4096))
            with httpx.Client(verify=client_ssl(ca), timeout=TIMEOUT) as client:
                r = client.get(
                    f"https://127.0.0.1:{port}/echo/hi",
                    headers={"X-API-Key": "k1"},
                    extensions={"sni_hostname": "api.example.test"},
                )
            assert r.status_code == 200


def test_certificates_reload_under_load_without_a_failed_request(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    live = tmp_path / "live"
    live.mkdir()
    first = ca.issue("first", dns=("api.example.test",), cn="first")
    second = ca.issue("second", dns=("api.example.test",), cn="second")
    shutil.copy(first.cert, live / "api.pem")
    shutil.copy(first.key, live / "api.key")
    listener = {
        "listen": f"127.0.0.1:{free_port()}",
        "certificates": [{"cert": str(live / "api.pem"), "key": str(live / "api.key")}],
    }
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream, plans=ETERNAL)], tls=listener)
        with run_gateway(config, tmp_path, "--no-watch") as gw:
            port = tls_port(config)
            assert served_name(port, "api.example.test", ca) == "first"
            failures: list[str] = []
            done = threading.Event()
            counts = [0]

            def load(new_connections: bool) -> None:
                ctx = client_ssl(ca)
                with httpx.Client(verify=ctx, timeout=TIMEOUT) as client:
                    while not done.is_set():
                        try:
                            if new_connections:
                                with httpx.Client(verify=ctx, timeout=TIMEOUT) as one:
                                    r = one.get(
                                        f"https://127.0.0.1:{port}/echo/x",
                                        headers={"X-API-Key": "k1"},
                                        extensions={"sni_hostname": "api.example.test"},
                                    )
                            else:
                                r = client.get(
                                    f"https://127.0.0.1:{port}/echo/x",
                                    headers={"X-API-Key": "k1"},
                                    extensions={"sni_hostname": "api.example.test"},
                                )
                            if r.status_code != 200:
                                failures.append(f"{r.status_code} {r.text}")
                            counts[0] += 1
                        except httpx.HTTPError as exc:
                            failures.append(repr(exc))

            threads = [threading.Thread(target=load, args=(n,)) for n in (False, True, True)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            # Replace both files (key first: a moment of mismatched files is refused, the
            # old pair kept), then tell the gateway.
            shutil.copy(second.key, live / "api.key.tmp")
            os.replace(live / "api.key.tmp", live / "api.key")
            shutil.copy(second.cert, live / "api.pem.tmp")
            os.replace(live / "api.pem.tmp", live / "api.pem")
            gw.proc.signal(1)  # SIGHUP
            wait_for(lambda: served_name(port, "api.example.test", ca) == "second", what="reload")
            time.sleep(0.5)
            done.set()
            for t in threads:
                t.join()
            assert not failures, failures[:5]
            assert counts[0] > 20
            # A broken file is refused; the certificate in use stays.
            (live / "api.pem").write_text("not a certificate")
            gw.proc.signal(1)
            time.sleep(1.0)
            assert served_name(port, "api.example.test", ca) == "second"
            assert "cannot load the certificate" in gw.proc.stderr() or "not a readable" in (
                gw.proc.stderr()
            )


def test_certificates_reload_when_the_files_change(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    first = ca.issue("first", dns=("api.example.test",), cn="first")
    second = ca.issue("second", dns=("api.example.test",), cn="second")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.cert, live / "api.pem")
    shutil.copy(first.key, live / "api.key")
    listener = {
        "listen": f"127.0.0.1:{free_port()}",
        "certificates": [{"cert": str(live / "api.pem"), "key": str(live / "api.key")}],
    }
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)], tls=listener)
        with run_gateway(config, tmp_path):
            port = tls_port(config)
            assert served_name(port, "api.example.test", ca) == "first"
            shutil.copy(second.key, live / "api.key")
            shutil.copy(second.cert, live / "api.pem")
            wait_for(lambda: served_name(port, "api.example.test", ca) == "second", what="reload")


def mtls_config(tmp_path: Path, upstream: int, ca: CertificateAuthority) -> dict[str, Any]:
    clients = CertificateAuthority(tmp_path / "clients", name="client CA")
    by_hash = clients.issue("by-hash", cn="app-hash", client=True)
    by_subject = clients.issue("by-subject", cn="app-subject", org="Acme", client=True)
    by_san = clients.issue("by-san", uris=("spiffe://acme.test/ns/prod/sa/web",), client=True)
    product = example_product(
        upstream,
        plans=ETERNAL,
        auth={"type": "mtls"},
        applications=[
            {"id": "hash", "plan": "basic", "certificates": [{"sha256": by_hash.sha256}]},
            {
                "id": "subject",
                "plan": "basic",
                "certificates": [{"subject": "CN=app-subject, O=Acme"}],
            },
            {
                "id": "san",
                "plan": "basic",
                "certificates": [{"san": "spiffe://acme.test/ns/prod/sa/web"}],
            },
        ],
    )
    config = gateway_config(
        [product],
        tls=tls_listener(ca, client_ca=str(clients.cert_path), client_auth="optional"),
    )
    config["_clients"] = clients
    config["_certs"] = {"hash": by_hash, "subject": by_subject, "san": by_san}
    return config


def test_client_certificates_identify_applications(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        config = mtls_config(tmp_path, upstream, ca)
        clients: CertificateAuthority = config.pop("_clients")
        certs = config.pop("_certs")
        unknown = clients.issue("unknown", cn="stranger", client=True)
        expired = clients.issue("expired", cn="app-hash", client=True, expired=True)
        selfsigned = clients.issue(
            "self", cn="app-subject", org="Acme", client=True, self_signed=True
        )
        with run_gateway(config, tmp_path) as gw:
            port = tls_port(config)
            url = f"https://127.0.0.1:{port}/echo/hi"
            sni = {"sni_hostname": "api.example.test"}

            def get(cert: Any) -> httpx.Response:
                with httpx.Client(verify=client_ssl(ca, cert), timeout=TIMEOUT) as client:
                    return client.get(url, extensions=sni)

            for app, cert in certs.items():
                r = get(cert)
                assert r.status_code == 200, (app, r.text)
            wait_for(
                lambda: {e.get("application") for e in gw.access_log()} >= set(certs),
                what="each application in the access log",
            )
            r = get(unknown)
            assert r.status_code == 403
            assert unknown.sha256 in r.json()["detail"]
            r = get(None)
            assert r.status_code == 401
            assert "client certificate" in r.json()["title"]
            for bad in (expired, selfsigned):
                with pytest.raises(httpx.HTTPError):
                    get(bad)
            # Over cleartext there is no certificate: 401, never another application.
            r = httpx.get(f"{gw.url}/echo/hi", timeout=TIMEOUT)
            assert r.status_code == 401
            assert get(certs["hash"]).status_code == 200


def test_required_client_certificates_refuse_the_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    with echo_upstream(tmp_path) as upstream:
        config = mtls_config(tmp_path, upstream, ca)
        config["tls"]["client_auth"] = "required"
        config.pop("_clients")
        certs = config.pop("_certs")
        with run_gateway(config, tmp_path):
            port = tls_port(config)
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with handshake(port, "api.example.test", client_ssl(ca)) as tls:
                    # TLS 1.3 reports a refused client certificate on the first read.
                    tls.sendall(b"GET /echo/hi HTTP/1.1\r\nHost: x\r\n\r\n")
                    if not tls.recv(100):
                        raise ConnectionError("closed")
            with httpx.Client(verify=client_ssl(ca, certs["san"]), timeout=TIMEOUT) as client:
                r = client.get(
                    f"https://127.0.0.1:{port}/echo/hi",
                    extensions={"sni_hostname": "api.example.test"},
                )
            assert r.status_code == 200
            assert json.loads(r.text)["path"]
