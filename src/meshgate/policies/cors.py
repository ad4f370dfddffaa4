"""Cross-origin resource sharing (APIcast ``cors``, Kong ``cors``).

Preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) are
answered in the rewrite phase, before authentication, so they need no credential: 204
with the ``Access-Control-*`` fields for an allowed origin, 403 otherwise. Every other
response to an allowed origin, including the gateway's own 401 and 429, gets
``Access-Control-Allow-Origin`` in the response phase.

Origins are exact ``scheme://host[:port]`` strings or ``"*"``. With credentials the
allowed origin is echoed, never ``"*"``; so ``"*"`` with ``allow_credentials`` lets
every origin read responses with the user's cookies: list origins instead if you can.
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from meshgate.policies._base import Policy, PolicyConfig
from meshgate.policies.headers import check_field_name, is_field_name
from meshgate.proxy import Exchange, Headers, Response, problem

__all__ = ["CorsConfig", "CorsPolicy"]

_ORIGIN = re.compile(
    r"[a-z][a-z0-9+.\-]*://(\[[0-9a-f:.]+\]|[a-z0-9\-._~]+)(:[0-9]{1,5})?", re.IGNORECASE
)
_DEFAULT_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _tokens(value: str) -> list[str]:
    """The valid tokens of a comma-separated request field; others are dropped."""
    return [part for part in (p.strip() for p in value.split(",")) if is_field_name(part)]


class CorsConfig(PolicyConfig):
    allow_origins: list[str] = Field(
        ["*"], min_length=1, description='Exact origins like https://app.example.com, or "*".'
    )
    allow_methods: list[str] = Field(
        _DEFAULT_METHODS, min_length=1, description='Methods a preflight allows, or "*".'
    )
    allow_headers: list[str] | None = Field(
        None,
        description='Request headers a preflight allows, or "*"; '
        "unset echoes the preflight's Access-Control-Request-Headers.",
    )
    expose_headers: list[str] = Field([], description="Response headers scripts may read.")
    allow_credentials: bool = Field(False, description="Allow cookies and Authorization.")
    max_age: int | None = Field(
        None, ge=0, description="Seconds a browser may cache a preflight answer."
    )

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: use scheme://host[:port] "
                    'without path or trailing slash, e.g. https://app.example.com, or "*"'
                )
        return [o.lower() for o in value]

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        return [m if m == "*" else check_field_name(m).upper() for m in value]

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [h if h == "*" else check_field_name(h) for h in value]

    @model_validator(mode="after")
    def _credentials(self) -> CorsConfig:
        if self.allow_credentials and "*" in self.expose_headers:
            raise ValueError(
                'browsers ignore expose_headers "*" on credentialed requests; list the header names'
            )
        return self


def _add_vary(headers: Headers, name: str) -> None:
    key = name.lower()
    for value in headers.get_all("vary"):
        for token in value.split(","):
            token = token.strip().lower()
            if token == key or token == "*":
                return
    headers.add("vary", name)


class CorsPolicy(Policy):
    """Answer preflights before authentication; mark responses readable by allowed origins."""

    name: ClassVar[str] = "cors"
    Config: ClassVar[type[PolicyConfig]] = CorsConfig

    def __init__(self, config: CorsConfig) -> None:
        super().__init__(config)
        self._any_origin = "*" in config.allow_origins
        self._origins = frozenset(config.allow_origins)
        self._credentials = config.allow_credentials
        # "*" means "any" to browsers only without credentials; with them, echo the request.
        self._echo_methods = config.allow_credentials and "*" in config.allow_methods
        self._methods = ", ".join(config.allow_methods)
        hdrs = config.allow_headers
        self._echo_headers = hdrs is None or (config.allow_credentials and "*" in hdrs)
        self._allow_headers = ", ".join(hdrs or [])
        self._expose = ", ".join(config.expose_headers)
        self._max_age = None if config.max_age is None else str(config.max_age)
        self._constant = self._any_origin and not config.allow_credentials

    def _allowed(self, headers: Headers) -> str | None:
        """The request's origin if it may read the answer, else None."""
        origins = headers.get_all("origin")
        if len(origins) != 1:
            return None
        origin = origins[0]
        if origin.lower() in self._origins:
            return origin
        if self._constant:
            return origin  # answered with "*", never echoed: any value is harmless
        if self._any_origin and _ORIGIN.fullmatch(origin):
            return origin
        return None

    def rewrite(self, exchange: Exchange) -> Response | None:
        request = exchange.request
        if request.method != "OPTIONS":
            return None
        headers = request.headers
        wanted = headers.get("access-control-request-method")
        if wanted is None or "origin" not in headers:
            return None
        origin = self._allowed(headers)
        if origin is None:
            return problem(403, "Forbidden", "CORS preflight from an origin that is not allowed")
        answer = Response(204)
        out = answer.headers
        self._allow_origin(out, origin)
        if self._echo_methods:
            method = _tokens(wanted)
            if method:
                out.add("access-control-allow-methods", method[0])
        else:
            out.add("access-control-allow-methods", self._methods)
        if self._echo_headers:
            requested = ", ".join(_tokens(headers.get("access-control-request-headers") or ""))
            if requested:
                out.add("access-control-allow-headers", requested)
            _add_vary(out, "Access-Control-Request-Headers")
        elif self._allow_headers:
            out.add("access-control-allow-headers", self._allow_headers)
        if self._max_age is not None:
            out.add("access-control-max-age", self._max_age)
        return answer

    def _allow_any(self, req_headers: Headers, headers: Headers) -> None:
        """The response phase of ``_allowed`` and ``_allow_origin`` when every origin gets
        ``"*"``: no decoding, and no search for a field the upstream rarely sends."""
        origins = 0
        for name, _ in req_headers.raw():
            if name == b"origin":
                origins += 1
        if origins != 1:
            return
        raw = headers.raw()
        for name, _ in raw:
            if name == b"access-control-allow-origin":
                headers.set("access-control-allow-origin", "*")
                break
        else:
            raw.append((b"access-control-allow-origin", b"*"))
        if self._expose:
            headers.set("access-control-expose-headers", self._expose)

    def _allow_origin(self, headers: Headers, origin: str) -> None:
        # set, not add: a second Access-Control-Allow-Origin (say, the upstream's) fails CORS.
        if self._constant:
            headers.set("access-control-allow-origin", "*")
            return
        headers.set("access-control-allow-origin", origin)
        if self._credentials:
            headers.set("access-control-allow-credentials", "true")
        _add_vary(headers, "Origin")

    def response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        request = exchange.request
        req_headers = request.headers
        if req_headers.get_raw(b"origin") is None:
            if not self._constant:
                _add_vary(headers, "Origin")
            return
        if request.method == "OPTIONS" and "access-control-request-method" in req_headers:
            return  # a preflight: the rewrite phase answered it with its own fields
        if self._constant:
            self._allow_any(req_headers, headers)
            return
        origin = self._allowed(req_headers)
        if origin is None:
            if not self._constant:
                _add_vary(headers, "Origin")
            return
        self._allow_origin(headers, origin)
        if self._expose:
            headers.set("access-control-expose-headers", self._expose)
