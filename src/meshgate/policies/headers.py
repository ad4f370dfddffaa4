"""Add, set and remove request and response header fields (APIcast ``headers``, Kong
``request-transformer`` / ``response-transformer``).

Edits apply in the order remove, set, add: ``remove`` deletes every field of a name,
``set`` replaces them with one field, ``add`` appends a field (a list appends several).
Values are literal except for the placeholders ``{request_id}`` and ``{client_ip}``
(the socket peer). Request edits run in the rewrite phase, so before authentication.
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from meshgate.config.model import FIELD_NAME
from meshgate.policies._base import Policy, PolicyConfig
from meshgate.proxy import Exchange, Headers, Request, Response

__all__ = ["HeaderEdits", "HeadersConfig", "HeadersPolicy", "check_field_name", "is_field_name"]

_TOKEN = re.compile(FIELD_NAME)
# Field values go on the wire as latin-1; control characters would break framing.
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PLACEHOLDERS = ("{request_id}", "{client_ip}")
# Framing and hop-by-hop fields belong to the engine: editing them invites smuggling.
_MANAGED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)


def is_field_name(name: str) -> bool:
    """Whether ``name`` is an HTTP token (a valid field name or method)."""
    return _TOKEN.fullmatch(name) is not None


def check_field_name(name: str) -> str:
    """Return ``name`` lowercased, or raise ValueError if it is not an HTTP token."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"
        )
    return name.lower()


def _check_editable(name: str) -> str:
    key = check_field_name(name)
    if key in _MANAGED:
        raise ValueError(f"{name!r} is managed by the proxy and cannot be edited by a policy")
    return key


def _check_value(value: str) -> str:
    if not _VALUE.fullmatch(value):
        raise ValueError(f"value {value[:40]!r} must be Latin-1 text without control characters")
    return value


class HeaderEdits(PolicyConfig):
    remove: list[str] = Field(default_factory=list, description="Header names to delete.")
    set: dict[str, str] = Field(
        default_factory=dict, description="Header fields to replace (one value each)."
    )
    add: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Header fields to append."
    )

    @field_validator("remove")
    @classmethod
    def _remove(cls, value: list[str]) -> list[str]:
        return [_check_editable(name) for name in value]

    @field_validator("set")
    @classmethod
    def _set(cls, value: dict[str, str]) -> dict[str, str]:
        out = {_check_editable(name): _check_value(v) for name, v in value.items()}
        if len(out) != len(value):
            raise ValueError("header names differ only in case; name each field once")
        return out

    @field_validator("add")
    @classmethod
    def _add(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        out: dict[str, str | list[str]] = {}
        for name, v in value.items():
            key = _check_editable(name)
            if key in out:
                raise ValueError(f"{name!r} is named twice; give a list of values instead")
            out[key] = [_check_value(x) for x in v] if isinstance(v, list) else _check_value(v)
        return out


class HeadersConfig(PolicyConfig):
    request: HeaderEdits = Field(default_factory=HeaderEdits, description="Edits upstream.")
    response: HeaderEdits = Field(default_factory=HeaderEdits, description="Edits to clients.")

    @model_validator(mode="after")
    def _not_empty(self) -> HeadersConfig:
        if not any(e.remove or e.set or e.add for e in (self.request, self.response)):
            raise ValueError("nothing to do: give request or response edits (remove, set, add)")
        return self


# (operation, name, value, has placeholders); operation is "remove", "set" or "add".
_Edit = tuple[str, str, str, bool]


def _compile(edits: HeaderEdits) -> tuple[_Edit, ...]:
    out: list[_Edit] = [("remove", name, "", False) for name in edits.remove]
    out += [("set", n, v, any(p in v for p in _PLACEHOLDERS)) for n, v in edits.set.items()]
    for name, values in edits.add.items():
        for v in values if isinstance(values, list) else [values]:
            out.append(("add", name, v, any(p in v for p in _PLACEHOLDERS)))
    return tuple(out)


def _apply(edits: tuple[_Edit, ...], headers: Headers, request: Request) -> None:
    for op, name, value, dynamic in edits:
        if op == "remove":
            headers.remove(name)
            continue
        if dynamic:
            value = value.replace("{request_id}", request.request_id).replace(
                "{client_ip}", request.client_ip
            )
        if op == "set":
            headers.set(name, value)
        else:
            headers.add(name, value)


class HeadersPolicy(Policy):
    """Edit request headers before authentication and response headers on every answer."""

    name: ClassVar[str] = "headers"
    Config: ClassVar[type[PolicyConfig]] = HeadersConfig

    def __init__(self, config: HeadersConfig) -> None:
        super().__init__(config)
        self._request = _compile(config.request)
        self._response = _compile(config.response)

    def rewrite(self, exchange: Exchange) -> Response | None:
        if self._request:
            _apply(self._request, exchange.request.headers, exchange.request)
        return None

    def response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        if self._response:
            _apply(self._response, headers, exchange.request)
