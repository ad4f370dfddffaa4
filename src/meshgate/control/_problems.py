"""Every error of the admin API as ``application/problem+json`` (RFC 9457), naming the field."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import PrimaryKeyConstraint, UniqueConstraint
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from meshgate.control.models import Base

__all__ = ["Problem", "install", "problem_response"]

log = logging.getLogger("meshgate.control")

_TITLES = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    412: "precondition failed",
    413: "content too large",
    415: "unsupported media type",
    422: "invalid request",
    428: "precondition required",
    429: "too many requests",
    500: "internal error",
    503: "unavailable",
}


class Problem(Exception):
    """A refused request: status, a one-line detail, and optionally the offending fields."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra
        if field is not None:
            self.extra["errors"] = [{"field": field, "message": detail}]


def problem_response(
    status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": _TITLES.get(status, "error"), "status": status}
    body["detail"] = detail
    body.update(extra)
    return JSONResponse(
        body, status_code=status, headers=headers, media_type="application/problem+json"
    )


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# Errors listed in one problem at most.
MAX_ERRORS = 200


def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            # A body that does not parse is malformed (400), as on integration routes; one
            # that parses but does not hold is invalid (422). FastAPI puts the character
            # offset where the field goes.
            where = error["loc"][-1]
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            message = f"not JSON: {reason} at {where}"
            return problem_response(
                400, f"body: {message}", errors=[{"field": "body", "message": message}]
            )
        if error["loc"] == ("body",) and error["type"] != "missing" and not _json(request):
            # The body was not parsed at all: it was not sent as JSON.
            return problem_response(
                415,
                "send the body as application/json",
                errors=[{"field": "header.content-type", "message": "must be application/json"}],
            )
        loc = _without_tags(error["loc"], {"body": exc.body}, error["type"] == "missing")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        errors.append({"field": _field(loc), "message": message})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    # Every error is listed, up to a bound a client can still read.
    return problem_response(422, detail, errors=errors[:MAX_ERRORS])


def _without_tags(loc: tuple[Any, ...], sent: Any, missing: bool) -> tuple[Any, ...]:
    """The location as the request spells it: union members add their tag (``jwt`` of
    ``{"type": "jwt"}``, ``function-after[...]``) to it; a user knows the field, not the tag."""
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and part.startswith("function-"):
            continue
        # A tag is a value of the object it stands in; a missing field is last, and absent.
        tag = isinstance(sent, dict) and part not in sent and part in sent.values()
        if tag and not (missing and i + 1 == len(loc)):
            continue
        out.append(part)
        sent = sent[part] if _has(sent, part) else None
    return tuple(out)


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, dict):
        return part in container
    return isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)


def _json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return kind.startswith("application/") and (
        kind == "application/json" or kind.endswith("+json")
    )


def _problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.detail, exc.headers, **exc.extra)


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
    extra: dict[str, Any] = {}
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the first route of the path; each method is a route here.
        headers["Allow"] = ", ".join(sorted(_allowed(request)))
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's body parser failed past JSON syntax (a 5000-digit number, deep nesting).
        reason = str(exc.__cause__).splitlines()[0][:200] if str(exc.__cause__) else detail
        detail = f"the body cannot be read: {reason}"
        extra["errors"] = [{"field": "body", "message": reason}]
    return problem_response(exc.status_code, detail, headers, **extra)


def _allowed(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


def _unique_columns(exc: IntegrityError) -> tuple[str, list[str]] | None:
    """The table and columns of the unique constraint a row violated, on either store."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    if diag is not None and diag.constraint_name:  # PostgreSQL names the constraint
        for table in Base.metadata.tables.values():
            for constraint in table.constraints:
                if (
                    isinstance(constraint, UniqueConstraint | PrimaryKeyConstraint)
                    and constraint.name == diag.constraint_name
                ):
                    return table.name, [c.name for c in constraint.columns]
        return None
    text = str(orig)
    if text.startswith("UNIQUE constraint failed: "):  # SQLite names table.column, ...
        columns = [c.strip() for c in text.removeprefix("UNIQUE constraint failed: ").split(",")]
        return columns[0].partition(".")[0], [c.partition(".")[2] for c in columns]
    return None


def _integrity(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IntegrityError)
    unique = _unique_columns(exc)
    if unique is not None:
        table, columns = unique
        # The last column is the one a user chose; the ones before scope it (its product).
        detail = f"{table}: another row has the same {', '.join(columns)}"
        return problem_response(
            409, detail, errors=[{"field": f"body.{columns[-1]}", "message": detail}]
        )
    text = str(getattr(exc, "orig", exc)).splitlines()[0][:300]
    return problem_response(409, f"conflicts with existing data: {text}")


def _stale(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(412, "the resource was changed by another request; read it again")


def _data(_request: Request, exc: Exception) -> JSONResponse:
    # The API's own checks should have refused the value; the store is the last line.
    log.warning("the store refused a value: %s", str(getattr(exc, "orig", exc)).splitlines()[0])
    return problem_response(422, "a value cannot be stored (out of range or not text)")


# SQLSTATEs of a transaction that lost to a concurrent one (serialization failure, deadlock):
# the request is fine and can be sent again.
_CONFLICTS = {"40001", "40P01"}


def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in _CONFLICTS:
        return problem_response(
            409,
            "a concurrent change got there first; send the request again",
            {"Retry-After": "0"},
        )
    log.error("database error: %s", exc)
    return problem_response(503, "the database is unavailable; try again", {"Retry-After": "1"})


def _internal(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal error; the control plane's log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(IntegrityError, _integrity)
    app.add_exception_handler(StaleDataError, _stale)
    app.add_exception_handler(DataError, _data)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(Exception, _internal)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error (RFC 9457); `errors` names the offending fields.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


def document_problems(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, saying what errors really are: problem+json, not FastAPI's
    validation error body, for every status an operation does not document otherwise."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status.startswith("4") or status.startswith("5"):
                    response["content"] = problem
            responses["default"] = {"description": "An error", "content": problem}
    for unused in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(unused, None)
    return schema
