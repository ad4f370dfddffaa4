"""The mesh CA: bootstrap tokens, workload certificates by CSR, renewals, rotation, the
operator's own root, and the root key encrypted at rest."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_support import ControlPlane, dump_database, problem, start_control
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from tls_support import CertificateAuthority as RootCA

from meshgate.config.identity import renewal_proof
from meshgate.identity import Material

TD = "meshgate.local"


def csr_for(key: Any = None, uris: tuple[str, ...] = ()) -> tuple[Any, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def make_token(cp: ControlPlane, service: str = "orders", **fields: Any) -> dict[str, Any]:
    return dict(cp.post("/mesh/bootstrap-tokens", {"service": service, **fields}))


def issue(cp: ControlPlane, token: str | None, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{cp.url}/dp/v1/identity/certificates", json=body, headers=headers, timeout=10, **kwargs
    )


def renewal(key: Any, chain: str, csr_pem: str, at: int | None = None) -> dict[str, Any]:
    at = int(time.time()) if at is None else at
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    signature = key.sign(renewal_proof(at, der), ec.ECDSA(hashes.SHA256()))
    return {
        "csr": csr_pem,
        "chain": chain,
        "timestamp": at,
        "signature": base64.b64encode(signature).decode(),
    }


def certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
        return True
    except Exception:
        return False


def test_bootstrap_tokens_issue_workload_certificates_and_every_refusal_says_why(
    tmp_path: Path, database_url: str
) -> None:
    cp = start_control(tmp_path, database_url)
    try:
        orders = make_token(cp)
        assert orders["spiffe_id"] == f"spiffe://{TD}/ns/production/sa/orders"
        assert orders["token"].startswith("mgb_") and orders["state"] == "active"
        key, csr = csr_for()

        # No token, a wrong one, a wrong scheme: no certificate.
        for token, reason in ((None, "no_credential"), ("mgb_wrong", "bad_token")):
            body = problem(issue(cp, token, {"csr": csr}), 401)
            assert body["reason"] == reason, body
        basic = httpx.post(
            f"{cp.url}/dp/v1/identity/certificates",
            json={"csr": csr},
            headers={"Authorization": "Basic eDp5"},
            timeout=10,
        )
        problem(basic, 401)
        # An admin token is not a bootstrap token.
        assert problem(issue(cp, cp.token, {"csr": csr}), 401)["reason"] == "bad_token"

        # Bad bodies, each with its reason, and none spends a single-use token.
        once = make_token(cp, single_use=True)["token"]
        _, rsa_weak = csr_for(rsa.generate_private_key(65537, 1024))
        _, ed = csr_for(ed25519.Ed25519PrivateKey.generate())
        _, p521 = csr_for(ec.generate_private_key(ec.SECP521R1()))
        tampered = csr.replace(csr.splitlines()[3], csr.splitlines()[3][:-4] + "AAAA")
        cert_pem = RootCA(tmp_path / "other").certificate.public_bytes(serialization.Encoding.PEM)
        for body, status, words in (
            ({"csr": rsa_weak}, 422, "1024 bits"),
            ({"csr": ed}, 422, "Ed25519"),
            ({"csr": p521}, 422, "secp521r1"),
            ({"csr": tampered}, 422, "csr"),
            ({"csr": cert_pem.decode()}, 422, "not a PEM certificate signing request"),
            ({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nnope\n"}, 422, "cannot be read"),
            ({"csr": 5}, 422, "is required"),
            ({}, 422, "is required"),
            (["csr"], 422, "JSON object"),
        ):
            answer = problem(issue(cp, once, body), status)
            assert words in answer["detail"], (words, answer)
        not_json = httpx.post(
            f"{cp.url}/dp/v1/identity/certificates",
            content=b'{"csr": ',
            headers={"Authorization": f"Bearer {once}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert "not JSON" in problem(not_json, 400)["detail"]
        as_text = httpx.post(
            f"{cp.url}/dp/v1/identity/certificates",
            content=csr.encode(),
            headers={"Authorization": f"Bearer {once}", "Content-Type": "text/plain"},
            timeout=10,
        )
        problem(as_text, 415)
        oversized = issue(cp, once, {"csr": csr, "padding": "x" * 70_000})
        problem(oversized, 413)

        # A CSR for another identity is refused, naming both.
        _, elsewhere = csr_for(uris=(f"spiffe://{TD}/ns/production/sa/payments",))
        refused = problem(issue(cp, once, {"csr": elsewhere}), 403)
        assert "sa/payments" in refused["detail"] and "sa/orders" in refused["detail"]
        _, with_dns = csr_for(uris=(f"spiffe://{TD}/ns/production/sa/orders", "https://x"))
        problem(issue(cp, once, {"csr": with_dns}), 403)

        # The single-use token still works once, then never again.
        _, own = csr_for(uris=(f"spiffe://{TD}/ns/production/sa/orders",))
        first = issue(cp, once, {"csr": own})
        assert first.status_code == 201, first.text
        assert problem(issue(cp, once, {"csr": own}), 401)["reason"] == "used_token"

        # The certificate: one URI SAN, server and client auth, not a CA, 24 h, chained.
        answer = issue(cp, orders["token"], {"csr": csr})
        assert answer.status_code == 201, answer.text
        doc = answer.json()
        [leaf] = certs(doc["certificate_chain"])
        [root] = certs(doc["trust_bundle"])
        assert issued_by(leaf, root)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.critical and [str(n.value) for n in san.value] == [orders["spiffe_id"]]
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        life = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert dt.timedelta(hours=23, minutes=58) < life <= dt.timedelta(hours=24)
        renew_at = dt.datetime.fromisoformat(doc["renew_at"])
        assert abs((renew_at - dt.datetime.now(dt.UTC)) - dt.timedelta(hours=12)) < dt.timedelta(
            minutes=1
        )
        assert doc["serial"] == format(leaf.serial_number, "x")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        material = Material.from_pem(
            doc["certificate_chain"].encode(), key_pem, doc["trust_bundle"].encode()
        )
        assert material.spiffe_id.service == "orders"

        # Raced: eight requests with one single-use token make exactly one certificate.
        raced = make_token(cp, single_use=True)["token"]
        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(
                pool.map(lambda _: issue(cp, raced, {"csr": csr}).status_code, range(8))
            )
        assert statuses == [201] + [401] * 7, statuses

        # Revoked and expired tokens.
        revoked = make_token(cp)
        assert cp.api.delete(f"/mesh/bootstrap-tokens/{revoked['id']}").status_code == 204
        assert problem(issue(cp, revoked["token"], {"csr": csr}), 401)["reason"] == (
            "revoked_token"
        )
        problem(cp.api.delete("/mesh/bootstrap-tokens/999999"), 404)
        expiring = make_token(cp, expires_in=1)
        time.sleep(2.05)
        expired = problem(issue(cp, expiring["token"], {"csr": csr}), 401)
        assert expired["reason"] == "expired_token" and "expired at" in expired["detail"]

        # Renewal: the current chain and a signature with the current key, no token.
        new_key, new_csr = csr_for()
        renewed = issue(cp, None, renewal(key, doc["certificate_chain"], new_csr))
        assert renewed.status_code == 201, renewed.text
        assert renewed.json()["spiffe_id"] == orders["spiffe_id"]
        [renewed_leaf] = certs(renewed.json()["certificate_chain"])
        assert renewed_leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == new_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        stranger = ec.generate_private_key(ec.SECP256R1())
        forged = problem(issue(cp, None, renewal(stranger, doc["certificate_chain"], new_csr)), 401)
        assert "does not verify" in forged["detail"]
        stale = renewal(key, doc["certificate_chain"], new_csr, at=int(time.time()) - 3600)
        problem(issue(cp, None, stale), 401)
        for hostile in ({"timestamp": 10**300}, {"timestamp": "now"}, {"signature": "%%"}):
            problem(
                issue(cp, None, {**renewal(key, doc["certificate_chain"], new_csr), **hostile}), 401
            )
        long_chain = {**renewal(key, doc["certificate_chain"] * 9, new_csr)}
        assert "8 certificates" in problem(issue(cp, None, long_chain), 401)["detail"]
        foreign = RootCA(tmp_path / "foreign").issue("x", uris=(orders["spiffe_id"],), client=True)
        foreign_key = serialization.load_pem_private_key(foreign.key.read_bytes(), None)
        untrusted = renewal(foreign_key, foreign.cert.read_text(), new_csr)
        assert problem(issue(cp, None, untrusted), 401)["reason"] == "untrusted"
        # Renewal keeps the identity: a CSR asking for another is refused.
        _, other_csr = csr_for(uris=(f"spiffe://{TD}/ns/production/sa/payments",))
        problem(issue(cp, None, renewal(key, doc["certificate_chain"], other_csr)), 403)

        # The bundle, with an ETag.
        bundle = httpx.get(f"{cp.url}/dp/v1/identity/bundle", timeout=10)
        assert bundle.status_code == 200 and bundle.text == doc["trust_bundle"]
        again = httpx.get(
            f"{cp.url}/dp/v1/identity/bundle",
            headers={"If-None-Match": bundle.headers["etag"]},
            timeout=10,
        )
        assert again.status_code == 304

        # Listed without their secret; refusals counted.
        listed = cp.api.get("/mesh/bootstrap-tokens", params={"service": "orders"}).json()
        states = {t["id"]: t["state"] for t in listed["items"]}
        assert states[revoked["id"]] == "revoked" and states[expiring["id"]] == "expired"
        assert "token" not in json.dumps(listed["items"]).replace("bootstrap_token", "")
        ca = cp.api.get("/ca").json()
        assert ca["trust_domain"] == TD and ca["mode"] == "self-signed"
        assert ca["refusals"]["weak_key"] == 3 and ca["refusals"]["used_token"] >= 8
        assert "certificate refused (wrong_name)" in cp.log()
        scraped = httpx.get(f"{cp.url}/metrics", timeout=10).text
        assert 'meshgate_control_ca_refusals_total{reason="weak_key"} 3.0' in scraped
        assert f"meshgate_control_ca_certificates_issued_total {ca['issued']}.0" in scraped
    finally:
        cp.stop()

    # At rest: the root's key only encrypted, tokens only hashed; the key file is private.
    stored = dump_database(database_url)
    text = json.dumps(stored, default=str)
    assert "PRIVATE KEY" not in text and orders["token"] not in text
    [root_row] = stored["ca_authorities"]
    assert root_row["key_encrypted"].startswith("aesgcm:v1:")
    hashes_stored = {r["token_hash"] for r in stored["mesh_bootstrap_tokens"]}
    assert hashlib.sha256(orders["token"].encode()).hexdigest() in hashes_stored
    key_file = tmp_path / "meshgate-data" / "ca.key"
    assert key_file.stat().st_mode & 0o777 == 0o600


def _prepare(url: str, data_dir: Path, **ca: Any) -> str:
    """The CA's start error in this process (as ``meshgate control`` prints it), or ''."""
    from meshgate.control import ControlPlane, ControlSettings
    from meshgate.control._ca import CaError, CaSettings

    plane = ControlPlane(ControlSettings(database_url=url, data_dir=data_dir, ca=CaSettings(**ca)))
    try:
        plane.prepare()
        return ""
    except CaError as exc:
        return str(exc)
    finally:
        plane.db.dispose()


def test_a_wrong_or_missing_ca_key_is_a_one_line_start_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    data_dir = tmp_path / "meshgate-data"
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("MESHGATE_CA_KEY", key)
    cp = start_control(tmp_path, url)
    bundle = httpx.get(f"{cp.url}/dp/v1/identity/bundle", timeout=10).text
    cp.stop()
    assert not (data_dir / "ca.key").exists()

    monkeypatch.setenv("MESHGATE_CA_KEY", base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(RuntimeError) as refused:
        start_control(tmp_path, url)
    errors = [line for line in str(refused.value).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "wrong key" in errors[0], str(refused.value)[-1500:]
    assert "Traceback" not in str(refused.value)

    # No key at all: the default key file is not made anew over an encrypted root.
    assert "no key decrypts it" in _prepare(url, data_dir)
    assert not (data_dir / "ca.key").exists()
    assert "32 random bytes in base64" in _prepare(url, data_dir, key="c2hvcnQ=")
    missing = _prepare(url, data_dir, key_file=tmp_path / "absent")
    assert "cannot read the CA key file" in missing
    # The right key, from a file this time, opens the same root.
    key_file = tmp_path / "ca-key"
    key_file.write_text(key + "\n")
    assert _prepare(url, data_dir, key_file=key_file) == ""
    dumped = dump_database(url)["ca_authorities"]
    assert len(dumped) == 1 and dumped[0]["cert_pem"] == bundle


def test_expired_and_foreign_domain_certificates_do_not_renew(tmp_path: Path) -> None:
    from meshgate.control._ca import CaSettings, CertificateAuthority, Refused
    from meshgate.control._db import Database

    db = Database(f"sqlite:///{tmp_path / 'control.db'}")
    db.migrate()
    ca = CertificateAuthority(db, CaSettings(), tmp_path)
    ca.prepare()
    signer = ca.state().signer
    now = dt.datetime.now(dt.UTC)

    def leaf(uri: str, not_after: dt.datetime) -> tuple[Any, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=2))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(signer.key, hashes.SHA256())
        )
        return key, cert.public_bytes(serialization.Encoding.PEM).decode()

    def refusal(key: Any, chain: str) -> Refused:
        _, new_csr = csr_for()
        body = renewal(key, chain, new_csr)
        csr = x509.load_pem_x509_csr(new_csr.encode())
        with pytest.raises(Refused) as refused:
            ca.verify_current(body["chain"], csr, body["timestamp"], body["signature"])
        return refused.value

    try:
        orders = f"spiffe://{TD}/ns/production/sa/orders"
        expired = refusal(*leaf(orders, now - dt.timedelta(minutes=1)))
        assert expired.code == "expired" and "expired at" in expired.detail
        foreign = refusal(*leaf("spiffe://other.example/ns/production/sa/orders", now + HOUR))
        assert foreign.code == "untrusted" and "meshgate.local" in foreign.detail
        key, chain = leaf(orders, now + HOUR)
        _, new_csr = csr_for()
        body = renewal(key, chain, new_csr)
        csr = x509.load_pem_x509_csr(new_csr.encode())
        proved = ca.verify_current(body["chain"], csr, body["timestamp"], body["signature"])
        assert proved.uri == orders
    finally:
        db.dispose()


HOUR = dt.timedelta(hours=1)


def test_a_root_rotation_trusts_both_roots_then_only_the_new_one(tmp_path: Path) -> None:
    cp = start_control(tmp_path, f"sqlite:///{tmp_path / 'control.db'}", None, "--cert-ttl", "60")
    try:
        made = subprocess.run(
            [sys.executable, "-m", "meshgate", "mesh", "token", "create", "--service", "orders",
             "--expires-in", "1h", "--control-plane", cp.url, "--token", cp.token],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        assert token.startswith("mgb_") and "shown once" in made.stderr
        key, csr = csr_for()
        first = issue(cp, token, {"csr": csr}).json()
        [old_root] = certs(first["trust_bundle"])
        [leaf] = certs(first["certificate_chain"])
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert dt.timedelta(seconds=60) <= life <= dt.timedelta(seconds=64)

        rotated = cp.api.post("/ca/rotate")
        assert rotated.status_code == 201, rotated.text
        assert [r["state"] for r in rotated.json()["roots"]] == ["previous", "active"]
        problem(cp.api.post("/ca/rotate"), 409)
        bundle = certs(httpx.get(f"{cp.url}/dp/v1/identity/bundle", timeout=10).text)
        assert len(bundle) == 2 and old_root in bundle
        [new_root] = [r for r in bundle if r != old_root]

        # Renewed with the old root's certificate: the new one chains to the new root.
        new_key, new_csr = csr_for()
        renewed = issue(cp, None, renewal(key, first["certificate_chain"], new_csr))
        assert renewed.status_code == 201, renewed.text
        [renewed_leaf] = certs(renewed.json()["certificate_chain"])
        assert issued_by(renewed_leaf, new_root) and not issued_by(renewed_leaf, old_root)
        assert len(certs(renewed.json()["trust_bundle"])) == 2

        retired = cp.api.post("/ca/retire")
        assert retired.status_code == 200, retired.text
        assert [r["state"] for r in retired.json()["roots"]] == ["retired", "active"]
        problem(cp.api.post("/ca/retire"), 409)
        assert certs(httpx.get(f"{cp.url}/dp/v1/identity/bundle", timeout=10).text) == [new_root]
        # A certificate of the retired root renews no more; one of the new root does.
        _, third = csr_for()
        old = problem(issue(cp, None, renewal(key, first["certificate_chain"], third)), 401)
        assert old["reason"] == "untrusted" and "retired" in old["detail"]
        chain = renewed.json()["certificate_chain"]
        assert issue(cp, None, renewal(new_key, chain, third)).status_code == 201
        actions = [
            e["action"] for e in cp.api.get("/audit", params={"resource": "ca"}).json()["items"]
        ]
        assert actions == ["retire", "rotate"]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "meshgate", "mesh", "token", *args]
            command += ["--control-plane", cp.url, "--token", cp.token]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        [row] = cp.api.get("/mesh/bootstrap-tokens").json()["items"]
        assert cli("revoke", str(row["id"])).returncode == 0
        listed = cli("list")
        assert listed.returncode == 0 and "revoked" in listed.stdout and token not in listed.stdout
        assert problem(issue(cp, token, {"csr": csr}), 401)["reason"] == "revoked_token"
    finally:
        cp.stop()


def _intermediate(root: RootCA, folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "operator intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=20))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    cert_path, key_path = folder / "intermediate.pem", folder / "intermediate.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_an_intermediate_under_the_operators_root_signs_and_the_bundle_is_that_root(
    tmp_path: Path,
) -> None:
    root = RootCA(tmp_path / "operator", "operator root")
    cert_path, key_path = _intermediate(root, tmp_path / "operator")
    url = f"sqlite:///{tmp_path / 'control.db'}"
    wrong_key = _prepare(url, tmp_path, cert=cert_path, cert_key=root.cert_path)
    assert "not an unencrypted PEM key" in wrong_key
    no_root = _prepare(url, tmp_path, cert=cert_path, cert_key=key_path)
    assert "give --ca-bundle" in no_root
    cp = start_control(
        tmp_path,
        url,
        None,
        "--ca-cert", str(cert_path),
        "--ca-key", str(key_path),
        "--ca-bundle", str(root.cert_path),
        "--trust-domain", "corp.example",
    )  # fmt: skip
    try:
        token = make_token(cp, "meshgate-gateway", env="staging")
        assert token["spiffe_id"] == "spiffe://corp.example/ns/staging/sa/meshgate-gateway"
        key, csr = csr_for()
        answer = issue(cp, token["token"], {"csr": csr})
        assert answer.status_code == 201, answer.text
        leaf, intermediate = certs(answer.json()["certificate_chain"])
        assert certs(answer.json()["trust_bundle"]) == [root.certificate]
        assert issued_by(leaf, intermediate) and issued_by(intermediate, root.certificate)
        # Renewals verify through the intermediate to the operator's root.
        _, new_csr = csr_for()
        renewed = issue(cp, None, renewal(key, answer.json()["certificate_chain"], new_csr))
        assert renewed.status_code == 201, renewed.text
        ca = cp.api.get("/ca").json()
        assert ca["mode"] == "intermediate" and ca["trust_domain"] == "corp.example"
        assert "your root" in problem(cp.api.post("/ca/rotate"), 409)["detail"]
    finally:
        cp.stop()
    assert dump_database(url)["ca_authorities"] == []
