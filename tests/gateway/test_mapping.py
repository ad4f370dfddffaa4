"""Mapping rules: prefix and exact patterns, wildcards, query requirements, last, parents."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.config.model import Product
from meshgate.gateway import mapping
from meshgate.gateway.mapping import MappingRules


def rules(
    *specs: dict[str, Any],
    metrics: list[dict[str, Any]] | None = None,
    case_insensitive: bool = False,
) -> MappingRules:
    names = {s["metric"] for s in specs}
    product = Product.model_validate(
        {
            "name": "shop",
            "backend": "http://127.0.0.1:9001",
            "auth": {"type": "api_key"},
            "metrics": metrics if metrics is not None else [{"name": n} for n in sorted(names)],
            "mapping_rules": list(specs),
            "case_insensitive_rules": case_insensitive,
        }
    )
    return MappingRules(product)


def rule(pattern: str, metric: str = "hits", **extra: Any) -> dict[str, Any]:
    return {"pattern": pattern, "metric": metric, **extra}


def matches(mr: MappingRules, path: str, query: str = "", method: str = "GET") -> bool:
    return mr.match(method, path, query) is not None


def test_default_rule_counts_every_request_as_one_hit() -> None:
    product = Product.model_validate(
        {"name": "p", "backend": "http://127.0.0.1:1", "auth": {"type": "api_key"}}
    )
    mr = MappingRules(product)
    assert mr.match("GET", "/", "") == {"hits": 1}
    assert mr.match("DELETE", "/any/thing/at/all", "x=1") == {"hits": 1}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/foo", True),
        ("/foo/", True),
        ("/foo/bar", True),
        ("/foobar", False),
        ("/fo", False),
        ("/", False),
        ("/bar/foo", False),
    ],
)
def test_prefix_matches_on_segment_boundaries(path: str, expected: bool) -> None:
    assert matches(rules(rule("/foo")), path) is expected


def test_prefix_ignores_the_query_string() -> None:
    assert matches(rules(rule("/foo")), "/foo", "x") is True


def test_root_pattern_matches_everything() -> None:
    mr = rules(rule("/"))
    for path in ("/", "/a", "/a/b/c", "/ü"):
        assert matches(mr, path)


def test_pattern_with_trailing_slash_needs_the_slash() -> None:
    mr = rules(rule("/foo/"))
    assert matches(mr, "/foo/")
    assert matches(mr, "/foo/bar")
    assert not matches(mr, "/foo")


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/foo", True), ("/foo/", False), ("/foo/bar", False), ("/foobar", False), ("/foo\n", False)],
)
def test_dollar_means_exact(path: str, expected: bool) -> None:
    assert matches(rules(rule("/foo$")), path) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/users/42", True),
        ("/users/42/orders", True),
        ("/users/ab-c_d.e~f", True),
        ("/users/", False),
        ("/users", False),
    ],
)
def test_wildcard_is_one_non_empty_segment(path: str, expected: bool) -> None:
    assert matches(rules(rule("/users/{id}")), path) is expected


def test_wildcard_in_the_middle_with_exact_end() -> None:
    mr = rules(rule("/users/{id}/orders$"))
    assert matches(mr, "/users/7/orders")
    assert not matches(mr, "/users/7/orders/1")
    assert not matches(mr, "/users/7/8/orders")
    assert not matches(mr, "/users//orders")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/words/hello.json", True),
        ("/words/a.b.json", True),
        ("/words/a.json.json", True),
        ("/words/.json", False),
        ("/words/hello.xml", False),
        ("/words/hello.jsonx", False),
        ("/words/hello.json/more", True),
    ],
)
def test_wildcard_sharing_a_segment_with_a_literal(path: str, expected: bool) -> None:
    assert matches(rules(rule("/words/{word}.json")), path) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/x.y.json", True),
        ("/x.y.z.json", True),
        ("/x.json", False),
        ("/.y.json", False),
        ("/x..json", False),
        ("/x.y.json/z", False),
    ],
)
def test_several_wildcards_in_one_segment(path: str, expected: bool) -> None:
    assert matches(rules(rule("/{a}.{b}.json$")), path) is expected


def test_adjacent_wildcards_need_one_character_each() -> None:
    mr = rules(rule("/{a}{b}$"))
    assert matches(mr, "/xy")
    assert not matches(mr, "/x")


def test_regex_metacharacters_are_literal() -> None:
    mr = rules(rule("/a.b+(c)[d]*$"))
    assert matches(mr, "/a.b+(c)[d]*")
    assert not matches(mr, "/axb+(c)[d]*")
    assert not matches(mr, "/a.bb(c)d")


def test_unicode_and_percent_encoded_literals_match_the_decoded_path() -> None:
    assert matches(rules(rule("/café/{x}")), "/café/ü")
    assert matches(rules(rule("/caf%C3%A9$")), "/café")
    assert not matches(rules(rule("/café")), "/cafe")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("q=shoes&type=full", True),
        ("type=full&q=shoes&other=1", True),
        ("q=&type=full", True),
        ("q&type=full", True),
        ("type=full", False),
        ("q=shoes&type=short", False),
        ("q=shoes", False),
        ("q=shoes&type=short&type=full", True),
        ("q=shoes&type=full&type=short", False),
        ("", False),
    ],
)
def test_required_query_parameters(query: str, expected: bool) -> None:
    mr = rules(rule("/search?q={q}&type=full"))
    assert matches(mr, "/search", query) is expected


def test_query_literals_compare_decoded() -> None:
    mr = rules(rule("/s?name=a%20b&any={}"))
    assert matches(mr, "/s", "name=a+b&any=1")
    assert matches(mr, "/s", "name=a%20b&any=")
    assert not matches(mr, "/s", "name=ab&any=1")


def test_query_requirement_with_exact_path() -> None:
    mr = rules(rule("/search$?q={q}"))
    assert matches(mr, "/search", "q=1")
    assert not matches(mr, "/search/x", "q=1")


def test_query_is_parsed_once_and_only_when_a_rule_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = mapping.parse_qsl

    def counting(query: str, **kwargs: Any) -> list[tuple[str, str]]:
        calls.append(query)
        return real(query, **kwargs)

    monkeypatch.setattr(mapping, "parse_qsl", counting)
    plain = rules(rule("/"), rule("/a"))
    assert plain.match("GET", "/a", "x=1") == {"hits": 2}
    assert calls == []
    needy = rules(rule("/a?x={x}"), rule("/a?y=2"), rule("/b?z={}"))
    assert needy.match("GET", "/a", "x=1&y=2") == {"hits": 2}
    assert calls == ["x=1&y=2"]


def test_every_matching_rule_adds_up() -> None:
    mr = rules(rule("/"), rule("/a"), rule("/b"), rule("/a/{x}", increment=3))
    assert mr.match("GET", "/a/1", "") == {"hits": 5}


def test_last_stops_after_adding() -> None:
    mr = rules(rule("/a", last=True), rule("/"), rule("/b", last=True), rule("/b"))
    assert mr.match("GET", "/a/x", "") == {"hits": 1}
    assert mr.match("GET", "/b", "") == {"hits": 2}
    assert mr.match("GET", "/c", "") == {"hits": 1}


def test_non_matching_last_rule_does_not_stop() -> None:
    mr = rules(rule("/a", last=True), rule("/"))
    assert mr.match("GET", "/z", "") == {"hits": 1}


def test_metric_and_every_ancestor_are_counted() -> None:
    metrics = [
        {"name": "hits"},
        {"name": "search", "parent": "hits"},
        {"name": "deep_search", "parent": "search"},
        {"name": "writes"},
    ]
    mr = rules(
        rule("/search/deep", "deep_search", increment=2),
        rule("/search", "search"),
        rule("/", "writes", method="POST"),
        metrics=metrics,
    )
    assert mr.match("GET", "/search/deep", "") == {"deep_search": 2, "search": 3, "hits": 3}
    assert mr.match("GET", "/search", "") == {"search": 1, "hits": 1}
    assert mr.match("POST", "/search", "") == {"search": 1, "hits": 1, "writes": 1}


def test_increment_zero_matches_but_adds_nothing() -> None:
    metrics = [{"name": "hits"}, {"name": "free", "parent": "hits"}]
    mr = rules(rule("/free", "free", increment=0), metrics=metrics)
    assert mr.match("GET", "/free", "") == {"free": 0, "hits": 0}
    assert mr.match("GET", "/paid", "") is None


def test_increment_above_one() -> None:
    assert rules(rule("/bulk", increment=25)).match("POST", "/bulk", "") == {"hits": 25}


def test_method_must_equal_or_rule_be_any() -> None:
    mr = rules(rule("/r", method="GET"), rule("/w", method="POST"), rule("/any"))
    assert matches(mr, "/r", method="GET")
    assert not matches(mr, "/r", method="HEAD")
    assert not matches(mr, "/r", method="POST")
    assert matches(mr, "/w", method="POST")
    assert not matches(mr, "/w", method="GET")
    for method in ("GET", "HEAD", "DELETE", "PROPFIND"):
        assert matches(mr, "/any", method=method)


def test_rules_keep_their_order_across_methods() -> None:
    mr = rules(rule("/x", method="GET", last=True), rule("/x", increment=10))
    assert mr.match("GET", "/x", "") == {"hits": 1}
    assert mr.match("PUT", "/x", "") == {"hits": 10}


def test_no_rule_matches() -> None:
    mr = rules(rule("/a", method="GET"), rule("/b$"))
    assert mr.match("GET", "/c", "") is None
    assert mr.match("POST", "/a", "") is None
    assert mr.match("GET", "/b/c", "") is None


def _elapsed(mr: MappingRules, path: str) -> float:
    start = time.perf_counter()
    mr.match("GET", path, "")
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "pattern",
    [
        "/{a}.{b}.{c}.{d}.json$",
        "/{a}{b}{c}{d}{e}x",
        "/{a}/{b}/{c}/{d}/x$",
        "/{a}-{b}-{c}/end",
        "/a/b/c/d/e/f/g/h/i/j/k/l/m/n$",
    ],
)
def test_hostile_paths_do_not_backtrack(pattern: str) -> None:
    mr = rules(rule(pattern))
    hostile = [
        "/" + "a." * 50_000,
        "/" + "a" * 100_000,
        "/" + "a-" * 50_000 + "/en",
        "/a" * 50_000,
        "/" + "/".join("ü" * 3 for _ in range(20_000)),
        "/" + "x/" * 30_000 + "x",
    ]
    for path in hostile:
        assert _elapsed(mr, path) < 0.05, (pattern, path[:20])


def _reference(pattern: str, path: str) -> bool:
    """The plain backtracking translation, fine on tiny inputs."""
    exact = pattern.endswith("$")
    body = pattern.rstrip("$")
    rx = "".join(
        "[^/]+" if re.fullmatch(r"\{\w*\}", part) else re.escape(part)
        for part in re.split(r"(\{\w*\})", body)
    )
    tail = r"\Z" if exact else ("" if body.endswith("/") else r"(?=/|\Z)")
    return re.match(rx + tail, path) is not None


_piece = st.sampled_from(["a", "b", ".", "/", "{x}", "ab"])


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.lists(_piece, max_size=6).map(lambda p: "/" + "".join(p)),
    exact=st.booleans(),
    path=st.lists(st.sampled_from(["a", "b", ".", "/"]), max_size=10).map(
        lambda p: "/" + "".join(p)
    ),
)
def test_compiled_patterns_agree_with_plain_regex(pattern: str, exact: bool, path: str) -> None:
    pattern += "$" if exact else ""
    assert matches(rules(rule(pattern)), path) is _reference(pattern, path)


@pytest.mark.parametrize(
    ("path", "sensitive", "insensitive"),
    [
        ("/admin", True, True),
        ("/ADMIN", False, True),
        ("/Admin/", False, True),
        ("/admin/users/7/keys", True, True),
        ("/admin/Users/7/KEYS", False, True),
        ("/ADMIN/users/7/keys/x", False, False),
        ("/administrator", False, False),
        ("/ADMINISTRATOR", False, False),
    ],
)
def test_case_insensitive_rules_ignore_the_case_of_path_patterns(
    path: str, sensitive: bool, insensitive: bool
) -> None:
    specs = (rule("/admin/$"), rule("/admin$"), rule("/admin/{section}/{id}/keys$", "keys"))
    assert matches(rules(*specs), path) is sensitive
    assert matches(rules(*specs, case_insensitive=True), path) is insensitive


def test_case_insensitive_rules_leave_query_requirements_as_they_are() -> None:
    mr = rules(rule("/search?type=full"), case_insensitive=True)
    assert matches(mr, "/SEARCH", "type=full")
    assert not matches(mr, "/SEARCH", "type=FULL")
    assert not matches(mr, "/SEARCH", "TYPE=full")


def test_case_insensitive_rules_fold_ascii_only() -> None:
    # The Kelvin sign folds to k under Unicode rules; a normalized path is ASCII anyway.
    mr = rules(rule("/k"), case_insensitive=True)
    assert matches(mr, "/K") and not matches(mr, "/\u212a")
