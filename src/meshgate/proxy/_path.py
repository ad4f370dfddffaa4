"""Request-target normalization: one canonical path for routing, matching and forwarding.

The path the gateway matches against its prefixes and rules is the path it forwards, so
``..``, ``%2e%2e`` and encoded slashes cannot route to one place and arrive at another.
Unreserved characters are decoded (RFC 3986 6.2.2.2), dot segments removed (5.2.4),
repeated slashes merged; encoded ``/``, ``\\`` and NUL are refused outright.

A ``;`` in the path is refused too, raw or encoded (as Spring's StrictHttpFirewall does):
servlet containers and others take ``/admin;x`` for ``/admin`` with a path parameter, and
``/..;/`` for ``/../``, so the upstream would act on a path the gateway never matched.
Stripping the parameter instead would forward something else than what was received.
"""

from __future__ import annotations

import re

__all__ = ["BadTarget", "split_target", "target_authority"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_FORBIDDEN_ENCODED = {
    b"2F": "an encoded slash",
    b"5C": "an encoded backslash",
    b"00": "NUL",
    b"3B": "an encoded semicolon",
}
_PATH_PARAMETER = (
    "the path holds a ; (a path parameter, which upstreams read differently: /a;x as /a, "
    "/..;/ as /../); send the path without it"
)
_ABSOLUTE = re.compile(rb"^[hH][tT][tT][pP][sS]?://([^/?#]*)")


class BadTarget(ValueError):
    """The request target cannot be served; the message says why (sent in a 400)."""


def split_target(raw: bytes) -> tuple[str, str]:
    """Return ``(normalized path, raw query)`` of a request target, or raise BadTarget."""
    # Single bytes are tested as ints (a memchr): ``b"#" in raw`` costs an exception
    # raised and cleared inside CPython on every call.
    if not raw.startswith(b"/"):
        m = _ABSOLUTE.match(raw)
        if m is None:
            raise BadTarget("the request target must be a path starting with /")
        if 0x40 in m.group(1):  # '@'
            raise BadTarget("a request target cannot hold user information (@)")
        raw = raw[m.end() :] or b"/"
        if not raw.startswith(b"/"):
            raw = b"/" + raw
    if 0x23 in raw:  # '#'
        raise BadTarget("a request target cannot hold a fragment (#)")
    path, sep, query = raw.partition(b"?")
    if 0x3B in path:  # ';'
        raise BadTarget(_PATH_PARAMETER)
    if 0x25 in path:  # '%'
        path = _decode_unreserved(path)
    if 0x5C in path or path.find(b"//") >= 0 or (0x2E in path and path.find(b"/.") >= 0):
        path = _remove_dot_segments(path)
    try:
        return path.decode("ascii"), query.decode("latin-1")
    except UnicodeDecodeError:
        raise BadTarget("the path must be ASCII; percent-encode other bytes") from None


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != 0x25:  # '%'
            out.append(c)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise BadTarget("the path holds a malformed percent-encoding")
        pair = pair.upper()
        if pair in _FORBIDDEN_ENCODED:
            raise BadTarget(f"the path holds {_FORBIDDEN_ENCODED[pair]} (%{pair.decode()})")
        value = int(pair, 16)
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + pair
        i += 3
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes:
    if 0x5C in path:  # '\\'
        raise BadTarget("the path holds a backslash")
    trailing = path.endswith(b"/") or path.endswith(b"/.") or path.endswith(b"/..")
    stack: list[bytes] = []
    for segment in path.split(b"/"):
        if segment == b"" or segment == b".":
            continue
        if segment == b"..":
            if not stack:
                raise BadTarget("the path climbs above the root with ..")
            stack.pop()
        else:
            stack.append(segment)
    out = b"/" + b"/".join(stack)
    if trailing and stack:
        out += b"/"
    return out


def target_authority(raw: bytes) -> bytes:
    """The ``host[:port]`` of an absolute-form target, which overrides Host (RFC 9112 3.2.2)."""
    m = _ABSOLUTE.match(raw)
    return m.group(1) if m is not None else b""
