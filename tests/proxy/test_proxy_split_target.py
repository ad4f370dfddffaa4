"""Unit tests of request-target normalization (``meshgate.proxy.split_target``)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshgate.proxy import BadTarget, split_target
from meshgate.proxy._path import target_authority

EXAMPLES = [
    (b"/", ("/", "")),
    (b"/a/b?x=1", ("/a/b", "x=1")),
    (b"/a/../b", ("/b", "")),
    (b"/a/./b/", ("/a/b/", "")),
    (b"/a/b/..", ("/a/", "")),
    (b"/a/b/.", ("/a/b/", "")),
    (b"/a/..", ("/", "")),
    (b"//a///b", ("/a/b", "")),
    (b"/%2e%2e/", None),
    (b"/a/%2E%2e/b", ("/b", "")),
    (b"/a/.%2e/b", ("/b", "")),
    (b"/%73earch", ("/search", "")),
    (b"/%7e%41", ("/~A", "")),
    (b"/a%20b%3f", ("/a%20b%3F", "")),
    (b"/a%252e%252e", ("/a%252e%252e", "")),
    (b"/a?q=/../%2f#", None),
    (b"/a?q=/../%2f", ("/a", "q=/../%2f")),
    (b"http://host.example/a/../b?q", ("/b", "q")),
    (b"HTTPS://host.example", ("/", "")),
    (b"http://host.example?q", ("/", "q")),
    (b"http://user@host.example/a", None),
    (b"/a%2fb", None),
    (b"/a%2Fb", None),
    (b"/a%5cb", None),
    (b"/a%00b", None),
    (b"/a\\b", None),
    (b"/a;x", None),
    (b"/a;", None),
    (b"/..;/x", None),
    (b"/a/..;/b", None),
    (b"/a%3bx", None),
    (b"/a%3B", None),
    (b"/a?x=1;y=2", ("/a", "x=1;y=2")),
    (b"/..", None),
    (b"/a/../..", None),
    (b"/%", None),
    (b"/%4", None),
    (b"/%g0", None),
    (b"/\xc3\xa9", None),
    (b"a/b", None),
    (b"*", None),
    (b"", None),
]


@pytest.mark.parametrize(("raw", "expected"), EXAMPLES)
def test_examples(raw, expected):
    if expected is None:
        with pytest.raises(BadTarget):
            split_target(raw)
    else:
        assert split_target(raw) == expected


_UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")

# Targets built from the characters that matter to normalization, plus escapes of them.
_pieces = st.sampled_from(
    [
        "/", "//", ".", "..", "/./", "/../", "a", "b", "~", "%2e", "%2E", "%2f", "%2F", "%5c",
        "%5C", "%00", "%41", "%7e", "%20", "%25", "%3f", "%", "%z", "\\", "?", "#", "x=1",
        "http://h", "é", ";", "..;", "%3b", "%3B",
    ]
)  # fmt: skip
path_like = st.lists(_pieces, max_size=20).map(lambda parts: "".join(parts).encode("utf-8"))


def _depth_goes_negative(path: bytes) -> bool:
    """Resolve a decoded path by hand: does some '..' climb above the root?"""
    depth = 0
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


def _decode_unreserved(path: bytes) -> bytes:
    def repl(m: re.Match[str]) -> str:
        value = int(m.group(1), 16)
        return chr(value) if value in _UNRESERVED else m.group(0)

    return _ESCAPE.sub(repl, path.decode("latin-1")).encode("latin-1")


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=64), path_like, path_like.map(lambda p: b"/" + p)))
@example(b"/a/%2e%2e/%2e%2e/b")
@example(b"/.%2e")
@example(b"/a/b/../../../")
@example(b"/a/..;/b")
def test_split_target_properties(raw):
    try:
        path, query = split_target(raw)
    except BadTarget:
        return
    # It never raises anything else (reaching here or BadTarget above), and:
    assert path.startswith("/")
    assert "/../" not in path + "/" and "/./" not in path + "/" and "//" not in path
    assert not path.endswith("/..") and not path.endswith("/.")
    assert "\\" not in path and "#" not in path and "?" not in path
    # No path parameter: nothing an upstream could read as /a or as a dot segment.
    assert ";" not in path
    for escape in re.findall(r"%(..)", path):
        assert re.fullmatch("[0-9A-F]{2}", escape), path
        assert int(escape, 16) not in _UNRESERVED, path
        assert escape not in ("2F", "5C", "00", "3B"), path
    # Normalization is idempotent: the forwarded path means what was matched.
    assert split_target(path.encode("ascii")) == (path, "")
    # The query is passed through byte for byte.
    if raw.startswith(b"/"):
        assert query == raw.partition(b"?")[2].decode("latin-1")


@settings(max_examples=1000, deadline=None)
@given(path_like.map(lambda p: b"/" + p))
def test_never_climbs_above_the_root(raw):
    """A target whose dot segments climb above '/' is refused, never clamped or kept."""
    path_part = raw.split(b"?")[0]
    decoded = _decode_unreserved(path_part)
    try:
        split_target(raw)
    except BadTarget:
        return
    assert not _depth_goes_negative(decoded), raw


def test_target_authority():
    assert target_authority(b"http://api.example.com:8080/a?b") == b"api.example.com:8080"
    assert target_authority(b"HTTPS://[::1]:8443") == b"[::1]:8443"
    assert target_authority(b"/a/b") == b""
    assert target_authority(b"*") == b""


def test_a_path_parameter_is_refused_with_a_message_that_says_why():
    with pytest.raises(BadTarget, match=r"holds a ; \(a path parameter"):
        split_target(b"/echo/admin;x")
    with pytest.raises(BadTarget, match="an encoded semicolon"):
        split_target(b"/echo/admin%3bx")
