"""Bearer tokens of the admin API and the data-plane API, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update

from meshgate.config import new_admin_token
from meshgate.control._problems import Problem
from meshgate.control.models import AdminToken, utcnow

__all__ = [
    "Actor",
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


def require(scope: str):  # type: ignore[no-untyped-def]
    """A dependency: the caller's :class:`Actor`, holding ``scope``; 401 or 403 otherwise."""

    def check(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Actor:
        challenge = {"WWW-Authenticate": 'Bearer realm="meshgate"'}
        if credentials is None or not credentials.credentials:
            raise Problem(401, "an Authorization: Bearer token is required", headers=challenge)
        token = credentials.credentials
        if len(token) > 512:
            raise Problem(401, "the token is not valid", headers=challenge)
        actor = request.app.state.plane.tokens.actor(request, token)
        if actor is None:
            raise Problem(401, "the token is not valid or has expired", headers=challenge)
        if scope not in actor.scopes:
            raise Problem(403, f"the token lacks the {scope!r} scope")
        return actor

    return check


Reader = Annotated[Actor, Depends(require("read"))]
Writer = Annotated[Actor, Depends(require("write"))]
DataplaneActor = Annotated[Actor, Depends(require("dataplane"))]
