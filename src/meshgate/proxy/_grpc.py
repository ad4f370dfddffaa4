"""gRPC as the engine sees it: recognising a call, its deadline, and refusing it the gRPC way.

gRPC rides on HTTP/2 and reports its outcome in trailers, not in the HTTP status. A
refusal by the engine or a role (a problem response) is answered as gRPC clients expect
it: HTTP 200 with ``grpc-status`` and ``grpc-message`` in a trailers-only response.
"""

from __future__ import annotations

import json

from meshgate.proxy._exchange import Request, Response

__all__ = [
    "GRPC_STATUS",
    "grpc_status",
    "grpc_timeout",
    "is_grpc",
    "problem_message",
    "trailers_only",
]

# gRPC status codes (grpc/doc/statuscodes.md) for the HTTP statuses the gateway answers.
GRPC_STATUS = {
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    413: 8,  # RESOURCE_EXHAUSTED
    429: 8,  # RESOURCE_EXHAUSTED
    502: 14,  # UNAVAILABLE
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}
_INTERNAL = 13
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
# grpc-message is percent-encoded: everything outside printable ASCII, and % itself.
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_grpc(request: Request) -> bool:
    """Whether the request is a gRPC call (``content-type: application/grpc[+proto|...]``)."""
    content_type = request.headers.get_raw(b"content-type")
    return content_type is not None and content_type.startswith(b"application/grpc")


def grpc_timeout(value: bytes | None) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``5S``, ``200m``: at most 8 digits and a unit);
    None when absent or malformed (the call then has no deadline of its own)."""
    if value is None or not 2 <= len(value) <= 9:
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def grpc_status(http_status: int) -> int:
    """The gRPC status code of a refusal with this HTTP status."""
    return GRPC_STATUS.get(http_status, _INTERNAL)


def _encode_message(message: str) -> bytes:
    out = bytearray()
    for byte in message.encode("utf-8"):
        if byte in _PLAIN:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(response: Response, message: str) -> list[tuple[bytes, bytes]]:
    """The fields of a trailers-only gRPC answer to ``response`` (a refusal): HTTP 200,
    ``grpc-status`` and ``grpc-message``, and the response's own fields (RateLimit,
    Retry-After...) but not its body's."""
    fields = [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status(response.status)).encode("ascii")),
        (b"grpc-message", _encode_message(message)),
    ]
    for name, value in response.headers.raw():
        if name != b"content-type" and name != b"content-length":
            fields.append((name, value))
    return fields


def problem_message(response: Response) -> str:
    """What a refusal says, for ``grpc-message``: its detail, else its title."""
    try:
        doc = json.loads(response.body)
    except ValueError:
        return response.body.decode(errors="replace")
    if not isinstance(doc, dict):
        return ""
    return str(doc.get("detail") or doc.get("title") or "")
