"""The CA's APIs: bootstrap tokens and roots for admins, certificates and the trust bundle
for workloads.

Admin (admin token, ``write`` scope to change):

- ``POST /admin/api/mesh/bootstrap-tokens`` ``{service, env, single_use, expires_in}``: a
  token that lets that service of that environment obtain its first certificate; the
  token is in this answer only (stored as a hash). ``GET`` lists them (no secret);
  ``DELETE .../{id}`` revokes one.
- ``GET /admin/api/ca``: trust domain, roots, bundle, counts; ``POST /admin/api/ca/rotate``
  makes a new root (both in the bundle), ``POST /admin/api/ca/retire`` drops the old one.

Data plane (no admin token: a bootstrap token or a renewal proves who asks):

- ``POST /dp/v1/identity/certificates`` ``{csr}`` with ``Authorization: Bearer <bootstrap
  token>``, or ``{csr, chain, timestamp, signature}`` to renew with the current identity.
- ``GET /dp/v1/identity/bundle``: the trust bundle, with an ETag.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from meshgate.config.identity import SpiffeId
from meshgate.control import schemas as s
from meshgate.control._auth import Reader, Writer, hash_token
from meshgate.control._ca import CaError, Refused, check_csr, parse_csr
from meshgate.control._crud import audit
from meshgate.control._problems import Problem, problem_response
from meshgate.control.models import BootstrapToken, utcnow

__all__ = ["MAX_IDENTITY_BODY", "admin", "dataplane"]

log = logging.getLogger("meshgate.control.ca")

admin = APIRouter(tags=["mesh identity"])
dataplane = APIRouter(prefix="/dp/v1/identity", tags=["mesh identity data plane"])

# A CSR is a kilobyte or two; a renewal adds the chain.
MAX_IDENTITY_BODY = 64 * 1024
_TOKEN_PREFIX = "mgb_"


class BootstrapTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    service: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="The service the certificates name (meshgate-gateway for edge gateways).",
    )
    env: s.Env = "production"
    single_use: bool = Field(False, description="Refused after its first certificate.")
    expires_in: int | None = Field(
        None, ge=1, le=366 * 86400, description="Seconds until it is refused; none: never."
    )


class BootstrapTokenOut(BaseModel):
    id: int
    service: str
    env: str
    spiffe_id: str
    single_use: bool
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    used_at: datetime | None
    uses: int
    revoked_at: datetime | None
    state: str = Field(description="active, used (single use), expired or revoked.")


class BootstrapTokenCreated(BootstrapTokenOut):
    token: str = Field(description="The token: shown in this answer only.")


def _aware(value: datetime | None) -> datetime | None:
    # SQLite gives naive datetimes back.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _state(row: BootstrapToken, now: datetime) -> str:
    expires = _aware(row.expires_at)
    if row.revoked_at is not None:
        return "revoked"
    if row.single_use and row.uses:
        return "used"
    if expires is not None and expires <= now:
        return "expired"
    return "active"


def _out(row: BootstrapToken, trust_domain: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "service": row.service,
        "env": row.env,
        "spiffe_id": SpiffeId(trust_domain, row.env, row.service).uri,
        "single_use": row.single_use,
        "expires_at": _aware(row.expires_at),
        "created_at": _aware(row.created_at),
        "created_by": row.created_by,
        "used_at": _aware(row.used_at),
        "uses": row.uses,
        "revoked_at": _aware(row.revoked_at),
        "state": _state(row, datetime.now(UTC)),
    }


@admin.post(
    "/mesh/bootstrap-tokens",
    status_code=201,
    response_model=BootstrapTokenCreated,
    operation_id="create_bootstrap_token",
    summary="A bootstrap token for a service's workload certificates (shown once)",
)
def create_token(request: Request, actor: Writer, body: BootstrapTokenIn) -> Any:
    plane = request.app.state.plane
    try:
        SpiffeId(plane.ca.trust_domain, body.env, body.service)
    except ValueError as exc:
        raise Problem(422, str(exc), field="body.service") from None
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=body.expires_in) if body.expires_in else None
    with plane.db.writer() as session, session.begin():
        row = BootstrapToken(
            token_hash=hash_token(token),
            service=body.service,
            env=body.env,
            single_use=body.single_use,
            expires_at=expires,
            created_by=actor.name,
            uses=0,
        )
        session.add(row)
        session.flush()
        out = _out(row, plane.ca.trust_domain)
        audit(
            session,
            actor,
            "create",
            "bootstrap_token",
            row.id,
            None,
            json.loads(BootstrapTokenOut.model_validate(out).model_dump_json()),
        )
    return {**out, "token": token}


@admin.get(
    "/mesh/bootstrap-tokens",
    response_model=s.Page[BootstrapTokenOut],
    operation_id="list_bootstrap_tokens",
    summary="The bootstrap tokens (never their secret), newest first",
)
def list_tokens(
    request: Request,
    _actor: Reader,
    service: str | None = Query(None, max_length=128),
    env: s.Env | None = Query(None),
    page: int = Query(1, ge=1, le=1_000_000),
    per_page: int = Query(50, ge=1, le=500),
) -> Any:
    plane = request.app.state.plane
    query = select(BootstrapToken)
    if service is not None:
        query = query.where(BootstrapToken.service == service)
    if env is not None:
        query = query.where(BootstrapToken.env == env)
    with plane.db.session() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        rows = session.scalars(
            query.order_by(BootstrapToken.id.desc()).offset((page - 1) * per_page).limit(per_page)
        ).all()
        items = [_out(r, plane.ca.trust_domain) for r in rows]
    return {"items": items, "page": page, "per_page": per_page, "total": total or 0}


@admin.delete(
    "/mesh/bootstrap-tokens/{token_id}",
    status_code=204,
    operation_id="revoke_bootstrap_token",
    summary="Revoke a bootstrap token: no certificate is issued with it from now on",
    responses={404: {"description": "No such token"}},
)
def revoke_token(
    request: Request, actor: Writer, token_id: Annotated[int, Path(ge=1, le=2**31 - 1)]
) -> Response:
    plane = request.app.state.plane
    with plane.db.writer() as session, session.begin():
        row = session.get(BootstrapToken, token_id)
        if row is None:
            raise Problem(404, f"no bootstrap token {token_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            audit(session, actor, "revoke", "bootstrap_token", token_id, None, None)
    return Response(status_code=204)


@admin.get("/ca", operation_id="read_ca", summary="The mesh CA: trust domain, roots and bundle")
def read_ca(request: Request, _actor: Reader) -> Any:
    return request.app.state.plane.ca.describe()


@admin.post(
    "/ca/rotate",
    status_code=201,
    operation_id="rotate_ca",
    summary="Start a root rotation: a new root signs, the old one stays in the bundle",
    responses={409: {"description": "A rotation is under way, or the CA is an intermediate"}},
)
def rotate(request: Request, actor: Writer) -> Any:
    ca = request.app.state.plane.ca
    try:
        root = ca.rotate()
    except CaError as exc:
        raise Problem(409, str(exc)) from None
    _audit(request, actor, "rotate", root)
    return ca.describe()


@admin.post(
    "/ca/retire",
    operation_id="retire_ca_root",
    summary="End a rotation: the previous root leaves the bundle",
    responses={409: {"description": "No rotation is under way"}},
)
def retire(request: Request, actor: Writer) -> Any:
    ca = request.app.state.plane.ca
    try:
        retired = ca.retire()
    except CaError as exc:
        raise Problem(409, str(exc)) from None
    _audit(request, actor, "retire", {"roots": retired})
    return ca.describe()


def _audit(request: Request, actor: Any, action: str, after: dict[str, Any]) -> None:
    with request.app.state.plane.db.writer() as session, session.begin():
        audit(session, actor, action, "ca", None, None, after)


# Data plane


@dataplane.get(
    "/bundle",
    operation_id="identity_bundle",
    summary="The trust bundle (PEM): the roots workload certificates chain to",
    response_class=Response,
    responses={
        200: {
            "description": "The roots, PEM, newest first",
            "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
        },
        304: {"description": "Not modified (If-None-Match)"},
    },
)
async def bundle(request: Request) -> Response:
    plane = request.app.state.plane
    pem, etag = await run_in_threadpool(plane.ca.bundle)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(pem, media_type="application/x-pem-file", headers=headers)


@dataplane.post(
    "/certificates",
    status_code=201,
    operation_id="issue_certificate",
    summary="A workload certificate for a CSR: with a bootstrap token, or renewing",
    responses={
        401: {"description": "No valid bootstrap token or renewal proof"},
        403: {"description": "The CSR asks for another identity"},
        413: {"description": "The body is over 64 KiB"},
        415: {"description": "The body is not application/json"},
        422: {"description": "Not a CSR, a bad signature, or a weak key"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["csr"],
                        "properties": {
                            "csr": {"type": "string", "description": "PEM CSR"},
                            "chain": {
                                "type": "string",
                                "description": "Renewal: the current chain (PEM), leaf first",
                            },
                            "timestamp": {"type": "integer", "description": "Renewal: now"},
                            "signature": {
                                "type": "string",
                                "description": "Renewal: base64 signature of "
                                "meshgate.config.identity.renewal_proof(timestamp, CSR DER) "
                                "with the current key (ECDSA or PKCS#1 v1.5, SHA-256)",
                            },
                        },
                    }
                }
            },
        }
    },
)
async def issue(request: Request) -> Response:
    plane = request.app.state.plane
    ca = plane.ca
    try:
        result = await _issue(request, plane)
    except Refused as refused:
        ca.refusals[refused.code] += 1
        log.warning(
            "certificate refused (%s) to %s: %s",
            refused.code,
            request.client.host if request.client else "?",
            refused.detail,
        )
        headers = {"WWW-Authenticate": 'Bearer realm="meshgate"'} if refused.status == 401 else None
        return problem_response(
            refused.status, refused.detail, headers=headers, reason=refused.code
        )
    return Response(
        json.dumps(result),
        status_code=201,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _issue(request: Request, plane: Any) -> dict[str, Any]:
    ca = plane.ca
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme and scheme.lower() != "bearer":
        raise Refused(401, "Authorization must be a Bearer bootstrap token", "no_credential")
    spiffe = None
    if token:
        # Checked before the body is read: who has no valid token learns nothing more.
        env, service = await run_in_threadpool(_token, plane, token, False)
        spiffe = SpiffeId(ca.trust_domain, env, service)
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, 'send the body as application/json: {"csr": PEM}', "body")
    raw = await request.body()
    if len(raw) > MAX_IDENTITY_BODY:
        raise Refused(413, f"the body exceeds {MAX_IDENTITY_BODY} bytes", "body")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Refused(400, f"the body is not JSON: {exc}", "body") from None
    if not isinstance(body, dict):
        raise Refused(422, 'the body must be a JSON object: {"csr": PEM}', "body")
    csr = parse_csr(body.get("csr"))
    if spiffe is None:
        spiffe = ca.verify_current(
            body.get("chain"), csr, body.get("timestamp"), body.get("signature")
        )
    check_csr(csr, spiffe)
    if token:
        # Used only now, with everything else checked: a bad CSR does not spend it.
        await run_in_threadpool(_token, plane, token, True)
    issued = await run_in_threadpool(ca.issue, csr, spiffe)
    return {
        "spiffe_id": issued.spiffe_id.uri,
        "certificate_chain": issued.chain_pem,
        "trust_bundle": issued.bundle_pem,
        "serial": issued.serial,
        "not_before": issued.not_before.isoformat(),
        "not_after": issued.not_after.isoformat(),
        "renew_at": issued.renew_at.isoformat(),
    }


def _token(plane: Any, token: str, spend: bool) -> tuple[str, str]:
    """The environment and service of the bootstrap token if it may be used; with ``spend``,
    its use recorded in the same transaction (the row locked: a single-use token raced
    serves one request only)."""
    if len(token) > 512 or not token.startswith(_TOKEN_PREFIX):
        raise Refused(401, "the bootstrap token is not valid", "bad_token")
    digest = hash_token(token)
    session_of = plane.db.writer if spend else plane.db.session
    with session_of() as session, session.begin():
        query = select(BootstrapToken).where(BootstrapToken.token_hash == digest)
        if spend:
            query = query.with_for_update()
        row = session.scalars(query).first()
        if row is None:
            raise Refused(401, "the bootstrap token is not valid", "bad_token")
        now = datetime.now(UTC)
        state = _state(row, now)
        if state == "revoked":
            raise Refused(401, "the bootstrap token was revoked", "revoked_token")
        if state == "expired":
            expires = _aware(row.expires_at)
            assert expires is not None
            raise Refused(
                401, f"the bootstrap token expired at {expires:%Y-%m-%dT%H:%M:%SZ}", "expired_token"
            )
        if state == "used":
            raise Refused(401, "the single-use bootstrap token was used already", "used_token")
        if spend:
            row.uses += 1
            row.used_at = utcnow()
        return row.env, row.service
