"""Bearer tokens of the admin API and the data-plane API, stored only as SHA-256 hashes."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from starlette.types import ASGIApp, Receive, Scope, Send

from meshgate.config import new_admin_token
from meshgate.control._problems import Problem, problem_response
from meshgate.control.models import AdminToken, utcnow

__all__ = [
    "Actor",
    "AuthenticationGate",
    "DataplaneActor",
    "Reader",
    "TokenCache",
    "Writer",
    "hash_token",
    "new_token",
    "require",
]

bearer = HTTPBearer(auto_error=False, description="An admin token: `Authorization: Bearer T`.")

# A token seen this recently is not looked up again (deletions apply at once in-process).
_CACHE_SECONDS = 5.0
# last_used_at is written at most this often per token, not on every request.
_TOUCH_SECONDS = 60.0


def hash_token(token: str) -> str:
    # Tokens are 32 random bytes: a fast hash is as safe as a slow one and costs nothing.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return new_admin_token()


@dataclass(frozen=True)
class Actor:
    name: str
    scopes: frozenset[str]


@dataclass
class _Entry:
    actor: Actor | None
    expires_at: datetime | None
    checked: float
    touched: float


class TokenCache:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def clear(self) -> None:
        self._entries.clear()

    def actor(self, request: Request, token: str) -> Actor | None:
        digest = hash_token(token)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is None or now - entry.checked > _CACHE_SECONDS:
            entry = self._load(request, digest, now, entry)
        if entry.actor is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= datetime.now(UTC):
            return None
        return entry.actor

    def _load(self, request: Request, digest: str, now: float, old: _Entry | None) -> _Entry:
        db = request.app.state.plane.db
        with db.session() as session:
            row = session.execute(
                select(
                    AdminToken.id, AdminToken.name, AdminToken.scopes, AdminToken.expires_at
                ).where(AdminToken.token_hash == digest)
            ).first()
        touched = old.touched if old is not None else 0.0
        if row is None:
            entry = _Entry(None, None, now, touched)
        else:
            expires = row.expires_at
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)  # SQLite gives naive datetimes back
            entry = _Entry(Actor(row.name, frozenset(row.scopes)), expires, now, touched)
            if now - touched > _TOUCH_SECONDS:
                entry.touched = now
                with db.writer() as session, session.begin():
                    session.execute(
                        update(AdminToken)
                        .where(AdminToken.id == row.id)
                        .values(last_used_at=utcnow())
                    )
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[digest] = entry
        return entry


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meshgate"'}
# Served to anyone: the API's own description.
_PUBLIC = ("/admin/api/openapi.json", "/admin/api/docs", "/admin/api/docs/oauth2-redirect")
# Swagger UI's scripts and styles, served from the package.
_PUBLIC_PREFIX = "/admin/api/docs/assets/"
# Authenticated by their own means: a bootstrap token or a workload's current certificate.
_OWN_AUTH = "/dp/v1/identity/"


def _authenticate(request: Request, authorization: str | None) -> Actor:
    """The actor of an ``Authorization: Bearer`` value; :class:`Problem` 401 otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "an Authorization: Bearer token is required", headers=_CHALLENGE)
    if len(token) > 512:
        raise Problem(401, "the token is not valid", headers=_CHALLENGE)
    actor = request.app.state.plane.tokens.actor(request, token)
    if actor is None:
        raise Problem(401, "the token is not valid or has expired", headers=_CHALLENGE)
    return actor


class AuthenticationGate:
    """Refuses a request to the admin or data-plane API without a valid token with 401
    before its body is read, so an unauthenticated caller learns nothing from how a body
    is checked (422, 413). Scopes are checked later, by each endpoint (403)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if (
            path.startswith(("/admin/api/", "/dp/v1/"))
            and path not in _PUBLIC
            and not path.startswith(_PUBLIC_PREFIX)
            and not path.startswith(_OWN_AUTH)
        ):
            request = Request(scope)
            try:
                # The token's first check reads the store: off the event loop.
                await asyncio.to_thread(
                    _authenticate, request, request.headers.get("authorization")
                )
            except Problem as refused:
                response = problem_response(refused.status, refused.detail, headers=refused.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def require(scope: str):  # type: ignore[no-untyped-def]
    """A dependency: the caller's :class:`Actor`, holding ``scope``; 401 or 403 otherwise."""

    def check(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Actor:
        # Checked by AuthenticationGate already (a token seen within seconds is cached);
        # again here, for an application served without the gate.
        token = credentials.credentials if credentials is not None else ""
        actor = _authenticate(request, f"Bearer {token}")
        if scope not in actor.scopes:
            raise Problem(403, f"the token lacks the {scope!r} scope")
        return actor

    return check


Reader = Annotated[Actor, Depends(require("read"))]
Writer = Annotated[Actor, Depends(require("write"))]
DataplaneActor = Annotated[Actor, Depends(require("dataplane"))]
