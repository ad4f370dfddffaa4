"""A test certificate authority for the mesh's mutual TLS: real X.509 certificates naming
SPIFFE IDs, made with ``cryptography``, written where sidecars read them."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOMAIN = "meshgate.local"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def spiffe(service: str, env: str = "production", domain: str = DOMAIN) -> str:
    return f"spiffe://{domain}/ns/{env}/sa/{service}"


class TestCa:
    """A root CA that issues workload certificates."""

    __test__ = False

    def __init__(self, name: str = "meshgate test root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _pem(self.cert)

    def issue(
        self, uri: str | None, *, expired: bool = False, dns: str | None = None
    ) -> tuple[bytes, bytes, int]:
        """A leaf naming ``uri`` (its one URI SAN): chain PEM, key PEM, serial number."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=24)
        if expired:
            start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        names: list[x509.GeneralName] = []
        if uri is not None:
            names.append(x509.UniformResourceIdentifier(uri))
        if dns is not None:
            names.append(x509.DNSName(dns))
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(cert), _key_pem(key), serial

    def write(self, directory: Path, uri: str | None, **kwargs: object) -> Files:
        """Issue a leaf and write chain, key and this CA's bundle under ``directory``."""
        chain, key, serial = self.issue(uri, **kwargs)  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True)
        files = Files(directory / "chain.pem", directory / "key.pem", directory / "bundle.pem")
        files.replace(chain, key, self.pem)
        files.serial = serial
        return files


class Files:
    """Where one identity's PEM files are."""

    def __init__(self, chain: Path, key: Path, bundle: Path) -> None:
        self.chain = chain
        self.key = key
        self.bundle = bundle
        self.serial = 0

    def replace(self, chain: bytes, key: bytes, bundle: bytes) -> None:
        for path, data in ((self.chain, chain), (self.key, key), (self.bundle, bundle)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    @property
    def flags(self) -> list[str]:
        return [
            "--identity-cert",
            str(self.chain),
            "--identity-key",
            str(self.key),
            "--trust-bundle",
            str(self.bundle),
        ]


def tls_call(
    port: int,
    bundle: Path,
    identity: Files | None,
    request: bytes = b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
) -> tuple[x509.Certificate, bytes]:
    """One request over mutual TLS to an inbound port: the server's certificate and every
    byte of the answer (empty if the server closed without one). Raises OSError (SSLError
    included) when the connection is refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(bundle))
    if identity is not None:
        ctx.load_cert_chain(str(identity.chain), str(identity.key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as conn:
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            conn.sendall(request)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    return x509.load_der_x509_certificate(der), data


def refused(port: int, bundle: Path, identity: Files | None) -> bool:
    """Whether a TLS caller with ``identity`` gets no answer (a refused handshake, a reset,
    or a close without a response)."""
    try:
        _, data = tls_call(port, bundle, identity)
    except OSError:
        return True
    return data == b""
