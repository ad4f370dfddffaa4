"""Workload identities: SPIFFE IDs, shared by the control plane's CA and the data planes.

A workload's identity is ``spiffe://<trust-domain>/ns/<environment>/sa/<service>``, the one
URI subject alternative name of its X.509 certificate. Edge gateways are workloads too,
under the reserved service name :data:`GATEWAY_SERVICE`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pydantic import Field

from meshgate.config._fields import _Strict

__all__ = [
    "GATEWAY_SERVICE",
    "IdentityFiles",
    "RENEWAL_WINDOW",
    "SpiffeId",
    "TRUST_DOMAIN",
    "renewal_proof",
]

# The trust domain when an operator names none.
TRUST_DOMAIN = "meshgate.local"
# The service name under which edge gateways get their identity; no mesh service may take it.
GATEWAY_SERVICE = "meshgate-gateway"

# How far a renewal's timestamp may be from the control plane's clock, in seconds.
RENEWAL_WINDOW = 300

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    env: str
    service: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ValueError(f"not a SPIFFE trust domain: {self.trust_domain!r}")
        for value in (self.env, self.service):
            if not _SEGMENT.fullmatch(value) or value in (".", ".."):
                raise ValueError(f"not a SPIFFE path segment: {value!r}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.env}/sa/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @property
    def is_gateway(self) -> bool:
        return self.service == GATEWAY_SERVICE

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The ID a URI names; ValueError with the reason when it is not a workload ID of
        this form."""
        if len(uri) > 2048 or not uri.startswith("spiffe://"):
            raise ValueError(f"not a SPIFFE ID: {uri[:80]!r}")
        domain, sep, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/") if sep else []
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(
                f"not a workload SPIFFE ID (spiffe://DOMAIN/ns/ENV/sa/SERVICE): {uri[:80]!r}"
            )
        return cls(domain, parts[1], parts[3])


def renewal_proof(timestamp: int, csr_der: bytes) -> bytes:
    """What a workload signs with its current key to renew its certificate without a
    bootstrap token: the new CSR (DER) bound to a time, so that the request proves it holds
    the identity now and cannot be replayed later."""
    return f"meshgate-renewal:{timestamp}:{hashlib.sha256(csr_der).hexdigest()}".encode()


class IdentityFiles(_Strict):
    """A workload identity read from files (a certificate issued outside meshgate's CA, by
    cert-manager or SPIRE say): the X.509-SVID chain, its key, and the trust bundle."""

    cert: str = Field(min_length=1, description="PEM certificate chain, leaf first.")
    key: str = Field(min_length=1, description="PEM private key of the leaf (unencrypted).")
    bundle: str = Field(min_length=1, description="PEM trust bundle: the roots to trust.")
