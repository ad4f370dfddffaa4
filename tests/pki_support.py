"""A test certificate authority made with ``cryptography``: roots, SPIFFE workload identities."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshgate.identity import Identity, Material

GATEWAY = "meshgate-gateway"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Issued:
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes

    def identity(self) -> Identity:
        return Identity(Material.from_pem(self.chain_pem, self.key_pem, self.bundle_pem))

    def write(self, directory: Path, name: str) -> dict[str, str]:
        """The three files, as ``identity:`` settings (cert, key, bundle)."""
        paths = {}
        for part, data in (
            ("cert", self.chain_pem),
            ("key", self.key_pem),
            ("bundle", self.bundle_pem),
        ):
            path = directory / f"{name}-{part}.pem"
            path.write_bytes(data)
            paths[part] = str(path)
        return paths


class TestCA:
    """A root that issues X.509-SVIDs: ``spiffe://DOMAIN/ns/ENV/sa/SERVICE``."""

    __test__ = False

    def __init__(self, trust_domain: str = "meshgate.local", name: str = "meshgate test root"):
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.bundle_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        service: str,
        env: str = "production",
        *,
        trust_domain: str | None = None,
        lifetime: float = 3600,
        bundle_pem: bytes | None = None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        uri = f"spiffe://{trust_domain or self.trust_domain}/ns/{env}/sa/{service}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(seconds=lifetime))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            _pem_key(key),
            bundle_pem if bundle_pem is not None else self.bundle_pem,
        )
