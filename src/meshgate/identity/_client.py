"""A data plane's side of the mesh CA: obtain a certificate, renew it, follow the bundle.

The private key is made here, in memory, and never sent: the control plane gets a CSR.
The first certificate is asked for with a bootstrap token; renewals prove the current
identity instead (the new CSR signed with the current key, with the current chain), so a
single-use token is spent once. A renewal starts at half the certificate's life (less a
jitter), is retried with backoff while the current certificate is valid, and the current
identity is kept until a new one is in hand. The trust bundle is polled (ETag) so that a
root rotation reaches this process within ``bundle_interval`` seconds; when the bundle no
longer holds the root of the current certificate, a renewal starts at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import random
import time
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshgate.config.identity import renewal_proof
from meshgate.identity._material import Identity, IdentityError, Material
from meshgate.proxy.client import HttpError, request

__all__ = ["IdentityClient", "IdentityRefused"]

log = logging.getLogger("meshgate.identity")

_MAX_ANSWER = 256 * 1024
_TIMEOUT = 10.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 30.0


class IdentityRefused(Exception):
    """The control plane refused a certificate (401, 403, 422): the message is its reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class IdentityClient:
    """This process's workload identity, obtained from and kept current by the control plane.

    ``identity`` is None until the first certificate arrives, then the same
    :class:`~meshgate.identity.Identity` for the life of the client (renewals and new
    bundles :meth:`~meshgate.identity.Identity.update` it).
    """

    def __init__(
        self,
        url: str,
        bootstrap_token: str | None,
        *,
        bundle_interval: float = 15.0,
        directory: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.bootstrap_token = bootstrap_token
        self.bundle_interval = bundle_interval
        self.directory = directory
        self.identity: Identity | None = None
        self.serial: str | None = None
        self.renew_at: float | None = None  # time.time() of the next renewal
        self.renewals = 0
        self.last_error: str | None = None
        self.obtained = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._bundle_etag: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.get_running_loop().create_task(self._run())]

    async def wait(self, timeout: float) -> Identity | None:
        """The identity once obtained, or None after ``timeout`` seconds (it keeps trying)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.obtained.wait(), timeout)
        return self.identity

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.identity is not None:
            self.identity.close()

    def describe(self) -> dict[str, Any]:
        """What an admin endpoint shows: never the key."""
        doc: dict[str, Any] = {"spiffe_id": None, "last_error": self.last_error}
        material = self.identity.material if self.identity is not None else None
        if material is not None:
            doc.update(
                spiffe_id=material.spiffe_id.uri,
                serial=self.serial,
                not_before=material.not_before.isoformat(),
                not_after=material.not_after.isoformat(),
                renew_at=_iso(self.renew_at),
                renewals=self.renewals,
                bundle_roots=len(x509.load_pem_x509_certificates(material.bundle_pem)),
                issuer=x509.load_pem_x509_certificate(material.chain_pem).issuer.rfc4514_string(),
            )
        return doc

    def _failed(self, what: str, exc: Exception) -> None:
        message = f"{what}: {exc}"
        if message != self.last_error:
            log.warning("workload identity: %s", message)
        self.last_error = message

    # The loops

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while self.identity is None:
            try:
                self._install(await self._ask(None))
            except (HttpError, IdentityRefused, IdentityError, ValueError) as exc:
                self._failed("no certificate yet", exc)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX)
        bundle = asyncio.get_running_loop().create_task(self._follow_bundle())
        self._tasks.append(bundle)
        await self._renew_forever()

    async def _renew_forever(self) -> None:
        while True:
            assert self.identity is not None and self.renew_at is not None
            material = self.identity.material
            life = (material.not_after - material.not_before).total_seconds()
            # Up to a tenth of the life early, so that replicas started together spread out.
            delay = self.renew_at - time.time() - random.uniform(0, life / 10)
            self._renew_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), max(delay, 0))
            backoff = _BACKOFF_MIN
            while True:
                try:
                    self._install(await self._renew())
                    self.renewals += 1
                    break
                except (HttpError, IdentityRefused, IdentityError, ValueError) as exc:
                    self._failed("renewal failed, the current certificate is kept", exc)
                left = self.identity.material.lifetime_left()
                # Quicker retries as expiry nears; once expired, the plain backoff.
                wait = (min(backoff, max(left / 10, 0.2)) if left > 0 else backoff) * (
                    1 + random.random() / 2
                )
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _renew(self) -> tuple[dict[str, Any], bytes]:
        try:
            return await self._ask(self.identity)
        except IdentityRefused as exc:
            # Not renewable (its root retired, say): a token still good gets a new one.
            if exc.status == 401 and self.bootstrap_token:
                return await self._ask(None)
            raise

    async def _follow_bundle(self) -> None:
        while True:
            await asyncio.sleep(self.bundle_interval)
            try:
                await self._refresh_bundle()
            except (HttpError, IdentityError, ValueError) as exc:
                self._failed("trust bundle", exc)

    async def _refresh_bundle(self) -> None:
        headers = {"If-None-Match": self._bundle_etag} if self._bundle_etag else {}
        response = await request(
            "GET",
            f"{self.url}/dp/v1/identity/bundle",
            headers=headers,
            timeout=_TIMEOUT,
            max_body=_MAX_ANSWER,
        )
        if response.status == 304:
            return
        if response.status != 200:
            raise HttpError(f"the trust bundle: HTTP {response.status}")
        identity = self.identity
        assert identity is not None
        current = identity.material
        if response.body != current.bundle_pem:
            identity.update(Material.from_pem(current.chain_pem, current.key_pem, response.body))
            roots = len(x509.load_pem_x509_certificates(response.body))
            log.info("trust bundle updated: %d root(s)", roots)
            if not _chains_to(current.chain_pem, response.body):
                log.info("the bundle no longer holds this certificate's root: renewing now")
                self._renew_now.set()
        self._bundle_etag = response.headers.get("etag")

    # One request

    async def _ask(self, current: Identity | None) -> tuple[dict[str, Any], bytes]:
        """A new key and its certificate: with the bootstrap token, or proving ``current``."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
        body: dict[str, Any] = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
        headers = {"Content-Type": "application/json"}
        if current is None:
            if not self.bootstrap_token:
                raise IdentityRefused(401, "no bootstrap token to ask with")
            headers["Authorization"] = f"Bearer {self.bootstrap_token}"
        else:
            material = current.material
            own = serialization.load_pem_private_key(material.key_pem, password=None)
            now = int(time.time())
            proof = renewal_proof(now, csr.public_bytes(serialization.Encoding.DER))
            if not isinstance(own, ec.EllipticCurvePrivateKey):
                raise IdentityError("the current key is not the EC key this client made")
            signature = own.sign(proof, ec.ECDSA(hashes.SHA256()))
            body.update(
                chain=material.chain_pem.decode("ascii"),
                timestamp=now,
                signature=base64.b64encode(signature).decode("ascii"),
            )
        response = await request(
            "POST",
            f"{self.url}/dp/v1/identity/certificates",
            headers=headers,
            body=json.dumps(body).encode(),
            timeout=_TIMEOUT,
            max_body=_MAX_ANSWER,
        )
        try:
            answer = json.loads(response.body)
        except ValueError:
            answer = None
        if response.status != 201 or not isinstance(answer, dict):
            detail = answer.get("detail") if isinstance(answer, dict) else None
            if response.status in (401, 403, 413, 415, 422):
                raise IdentityRefused(response.status, str(detail or "refused"))
            raise HttpError(f"HTTP {response.status}: {detail or response.body[:200]!r}")
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return answer, key_pem

    def _install(self, issued: tuple[dict[str, Any], bytes]) -> None:
        answer, key_pem = issued
        try:
            material = Material.from_pem(
                str(answer["certificate_chain"]).encode("ascii"),
                key_pem,
                str(answer["trust_bundle"]).encode("ascii"),
            )
            renew_at = dt.datetime.fromisoformat(str(answer["renew_at"])).timestamp()
        except (KeyError, ValueError, UnicodeEncodeError) as exc:
            raise IdentityError(f"the control plane's answer cannot be used: {exc}") from None
        if self.identity is None:
            self.identity = Identity(material, self.directory)
            log.info("workload identity %s until %s", material.spiffe_id, material.not_after)
        else:
            if material.spiffe_id != self.identity.spiffe_id:
                raise IdentityError(
                    f"a renewal named {material.spiffe_id}, not {self.identity.spiffe_id}"
                )
            self.identity.update(material)
            log.info("workload certificate renewed until %s", material.not_after)
        self.serial = str(answer.get("serial") or "")
        self.renew_at = renew_at
        self.last_error = None
        self._bundle_etag = None
        self.obtained.set()


def _chains_to(chain_pem: bytes, bundle_pem: bytes) -> bool:
    """Whether the chain's last certificate was issued by a root of the bundle."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    for root in x509.load_pem_x509_certificates(bundle_pem):
        try:
            chain[-1].verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()
