"""The mesh's traffic configuration in the SQL store: each environment's services (staging
takes every change, production what was promoted), checked together as one ``MeshConfig``
and published as immutable, versioned mesh snapshots that sidecars pull.

A change runs in one transaction that also publishes the environment's new version, under a
lock (PostgreSQL's advisory lock; SQLite's writers take the database's), so that versions
follow one another and each one holds every change committed before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from meshgate.config import ConfigError
from meshgate.config.loader import validate_mesh
from meshgate.config.mesh import MeshConfig
from meshgate.control import schemas as s
from meshgate.control._problems import Problem
from meshgate.control.models import MeshService, MeshSnapshot
from meshgate.control.snapshots import canonical

__all__ = [
    "documents",
    "latest",
    "lock",
    "promote",
    "publish",
    "storable_errors",
    "validated",
    "write",
]

# pg_advisory_xact_lock's key for changes to the mesh configuration ("mesh" in ASCII).
_LOCK = 0x6D657368
_INDEXED = re.compile(r"services\[(\d+)\](.*)")
# A service's own check names the part of it at fault first: "routes[0].destinations[1]: ...".
_PART = re.compile(r"([a-z_]+(?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*): (.*)", re.S)


def lock(session: Session) -> None:
    """Serialise the mesh changes of concurrent transactions (SQLite's writers already are:
    they begin IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})


def documents(session: Session, env: str) -> dict[str, dict[str, Any]]:
    """The environment's services by name, in name order, as stored."""
    rows = session.execute(
        select(MeshService.name, MeshService.document)
        .where(MeshService.env == env)
        .order_by(MeshService.name)
    ).all()
    return {row.name: row.document for row in rows}


def storable_errors(document: Any, where: str) -> list[dict[str, str]]:
    """What a store cannot hold in a document (NUL, lone surrogates), at its path."""
    try:
        s.storable(document, where)
    except ValueError as exc:
        path, _, message = str(exc).partition(": ")
        return [{"field": path, "message": message}]
    return []


def validated(
    services: Mapping[str, Any],
    own: Mapping[str, str],
    top: str = "services",
    status: int = 422,
    intro: str = "",
) -> MeshConfig:
    """``services`` (by name) checked together as a sidecar checks its mesh configuration;
    :class:`Problem` with every error otherwise. An error of a service in ``own`` is named
    from the prefix given for it (``body``, ``mesh.services[2]``), of any other service from
    ``services[NAME]``, and one of no service in particular (unique virtual IPs) ``top``."""
    names = list(services)
    try:
        return validate_mesh({"services": list(services.values())}, "mesh")
    except ConfigError as exc:
        errors = [_field_error(line, names, own, top) for line in exc.errors]
    detail = intro + "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    raise Problem(status, detail, errors=errors)


def _field_error(line: str, names: list[str], own: Mapping[str, str], top: str) -> dict[str, str]:
    path, _, message = line.partition(": ")
    if path == "top level":
        # Cross-references name their service's path in the message.
        inner, sep, rest = message.partition(": ")
        if sep and _INDEXED.fullmatch(inner):
            path, message = inner, rest
    match = _INDEXED.fullmatch(path)
    if match is None:
        return {"field": top, "message": message}
    name = names[int(match.group(1))]
    field = own.get(name, f"services[{name}]") + match.group(2)
    part = _PART.fullmatch(message)
    if part is not None and not match.group(2):
        field, message = f"{field}.{part.group(1)}", part.group(2)
    return {"field": field, "message": message}


def write(session: Session, env: str, services: Mapping[str, dict[str, Any]]) -> None:
    """Make the environment's stored services exactly ``services`` (by name)."""
    rows = {
        row.name: row for row in session.scalars(select(MeshService).where(MeshService.env == env))
    }
    for name, row in rows.items():
        if name not in services:
            session.delete(row)
    for name, document in services.items():
        stored = rows.get(name)
        if stored is None:
            session.add(MeshService(env=env, name=name, document=document))
        elif stored.document != document:
            stored.document = document
    session.flush()


def latest(session: Session, env: str) -> MeshSnapshot | None:
    return session.scalars(
        select(MeshSnapshot)
        .where(MeshSnapshot.env == env)
        .order_by(MeshSnapshot.version.desc())
        .limit(1)
    ).first()


def publish(session: Session, env: str, reason: str) -> MeshSnapshot | None:
    """Store a new version of the environment's mesh configuration when it changed; None
    when it did not. Takes the lock (a caller that read before writing took it already)."""
    lock(session)
    body, digest = canonical(list(documents(session, env).values()))
    current = latest(session, env)
    if current is not None and current.digest == digest:
        return None
    version = (current.version if current is not None else 0) + 1
    document = f'{{"version":"{version}","services":{body}}}'
    snapshot = MeshSnapshot(
        env=env,
        version=version,
        digest=digest,
        reason=reason[:200],
        size=len(document.encode()),
        document=document,
    )
    session.add(snapshot)
    session.flush()
    return snapshot


def promote(session: Session) -> tuple[int | None, MeshSnapshot | None]:
    """Production's services become staging's: production's version before, and the new
    version (None when production had them already)."""
    lock(session)
    before = latest(session, "production")
    write(session, "production", documents(session, "staging"))
    return (before.version if before is not None else None), publish(
        session, "production", "promote"
    )
