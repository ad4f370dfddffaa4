"""Every error of the admin API as ``application/problem+json`` (RFC 9457), naming the field."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException

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


def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for error in exc.errors():
        # Union members add their tag to the location; a user knows the field, not the tag.
        loc = tuple(
            p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        errors.append({"field": _field(loc), "message": str(error.get("msg", "invalid"))})
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem_response(422, detail, errors=errors)


def _problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.detail, exc.headers, **exc.extra)


def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
    return problem_response(exc.status_code, detail, dict(exc.headers or {}))


def _integrity(_request: Request, exc: Exception) -> JSONResponse:
    # The message of a unique or foreign key violation names the columns on both databases.
    text = str(getattr(exc, "orig", exc)).splitlines()[0][:300]
    return problem_response(409, f"conflicts with existing data: {text}")


def _stale(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(412, "the resource was changed by another request; read it again")


def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
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
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(Exception, _internal)
