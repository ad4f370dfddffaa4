"""Field types and checks shared by every configuration model (gateway, mesh).

Kept apart from the gateway's models so that a sidecar, which reads only the mesh's
configuration, does not build them.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})$")

# What configuration may put on the wire is checked here, so that files and a control plane
# refuse alike: a CR or LF in a URL or header would end a request head early (injection).
FIELD_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # an RFC 9110 token
_HOST = r"^[^\x00-\x20\x7f-\x9f]+$"  # no control characters, no spaces
_QUERY_NAME = r"^[^\x00-\x1f\x7f-\x9f]+$"  # no control characters
_URL = r"^[\x21-\x7e]+$"  # printable ASCII: no control characters, no spaces (RFC 3986)
_FIELD_NAME_RE = re.compile(FIELD_NAME)
_HOST_RE = re.compile(_HOST)
_QUERY_NAME_RE = re.compile(_QUERY_NAME)
_URL_RE = re.compile(_URL)


def _check_header_name(value: str) -> str:
    """The header field name, or ValueError unless it is an RFC 9110 token."""
    if _FIELD_NAME_RE.fullmatch(value) is None:
        raise ValueError(
            "must be a header name: letters, digits and !#$%&'*+-.^_`|~ "
            "(no spaces or control characters)"
        )
    return value


def _check_host(value: str) -> str:
    if _HOST_RE.fullmatch(value) is None:
        raise ValueError("must be a host name without spaces or control characters")
    return value


def _check_query_name(value: str) -> str:
    if _QUERY_NAME_RE.fullmatch(value) is None:
        raise ValueError("must be a query parameter name without control characters")
    return value


def _check_url(value: str) -> str:
    """The URL, or ValueError if it holds a space, a control character or non-ASCII text."""
    if _URL_RE.fullmatch(value) is None:
        raise ValueError(
            "must not contain spaces, control characters or non-ASCII characters "
            "(percent-encode them)"
        )
    return value


Url = Annotated[str, AfterValidator(_check_url), Field(json_schema_extra={"pattern": _URL})]
HeaderName = Annotated[
    str, AfterValidator(_check_header_name), Field(json_schema_extra={"pattern": FIELD_NAME})
]
HostName = Annotated[str, AfterValidator(_check_host), Field(json_schema_extra={"pattern": _HOST})]
QueryName = Annotated[
    str, AfterValidator(_check_query_name), Field(json_schema_extra={"pattern": _QUERY_NAME})
]


class Problems(ValueError):
    """Independent problems found by one validator; loaders report one a line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # No inf/nan: YAML's .inf would be an endless timeout, and JSON snapshots cannot carry it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_listen(value: str) -> str:
    m = _HOSTPORT.fullmatch(value)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
    return value
