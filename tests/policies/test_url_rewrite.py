from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.url_rewrite import UrlRewriteConfig
from meshgate.proxy import Exchange, Headers, Request


def rewrite(make_exchange, commands, path: str, method: str = "GET", query: str = "") -> str:
    chain = PolicyChain.build([{"url_rewrite": {"commands": commands}}])
    exchange = make_exchange(method, path, query=query)
    assert chain.rewrite(exchange) is None
    return exchange.route_path


def test_sub_replaces_the_first_match_only(make_exchange) -> None:
    assert rewrite(make_exchange, [{"regex": "a", "replace": "b"}], "/a/a/a") == "/b/a/a"


def test_global_replaces_every_match(make_exchange) -> None:
    commands = [{"regex": "a", "replace": "b", "global": True}]
    assert rewrite(make_exchange, commands, "/a/a/a") == "/b/b/b"


def test_groups_and_named_groups(make_exchange) -> None:
    commands = [
        {"regex": r"^/v1/users/(\d+)", "replace": r"/api/users/\1"},
        {"regex": r"/(?P<kind>orders|carts)$", "replace": r"/\g<kind>/list"},
    ]
    assert rewrite(make_exchange, commands, "/v1/users/42/orders") == "/api/users/42/orders/list"


def test_commands_apply_in_order_on_the_previous_result(make_exchange) -> None:
    commands = [{"regex": "^/a", "replace": "/b"}, {"regex": "^/b", "replace": "/c"}]
    assert rewrite(make_exchange, commands, "/a") == "/c"


def test_break_stops_after_a_match(make_exchange) -> None:
    commands = [
        {"regex": "^/a", "replace": "/b", "break": True},
        {"regex": "^/b", "replace": "/c"},
    ]
    assert rewrite(make_exchange, commands, "/a") == "/b"
    # break only applies when its command matched.
    assert rewrite(make_exchange, commands, "/b") == "/c"


def test_methods_limit_a_command(make_exchange) -> None:
    commands = [{"regex": "^/items", "replace": "/write/items", "methods": ["POST", "PUT"]}]
    assert rewrite(make_exchange, commands, "/items", "POST") == "/write/items"
    assert rewrite(make_exchange, commands, "/items", "PUT") == "/write/items"
    assert rewrite(make_exchange, commands, "/items", "GET") == "/items"


def test_skipped_command_does_not_break(make_exchange) -> None:
    commands = [
        {"regex": "^/a", "replace": "/b", "break": True, "methods": ["POST"]},
        {"regex": "^/a", "replace": "/c"},
    ]
    assert rewrite(make_exchange, commands, "/a", "GET") == "/c"


def test_result_keeps_a_leading_slash(make_exchange) -> None:
    assert rewrite(make_exchange, [{"regex": "^/", "replace": ""}], "/items") == "/items"
    assert rewrite(make_exchange, [{"regex": "^/.*", "replace": ""}], "/items") == "/"
    assert rewrite(make_exchange, [{"regex": "^/v1/", "replace": "v2/"}], "/v1/x") == "/v2/x"


def test_no_match_leaves_the_path(make_exchange) -> None:
    assert rewrite(make_exchange, [{"regex": "^/zzz", "replace": "/y"}], "/items") == "/items"


def test_query_and_request_path_are_untouched(make_exchange) -> None:
    chain = PolicyChain.build([{"url_rewrite": {"commands": [{"regex": "x", "replace": "y"}]}}])
    exchange = make_exchange("GET", "/x", query="x=1")
    chain.rewrite(exchange)
    assert exchange.route_path == "/y"
    assert exchange.request.path == "/x" and exchange.request.query == "x=1"


def test_non_ascii_and_huge_paths(make_exchange) -> None:
    commands = [{"regex": "caf\xe9", "replace": "cafe"}]
    assert rewrite(make_exchange, commands, "/caf\xe9/%E2%98%83") == "/cafe/%E2%98%83"
    huge = "/" + "a" * 200_000
    assert rewrite(make_exchange, [{"regex": "a+$", "replace": "b"}], huge) == "/b"


def test_regex_syntax_is_pythons() -> None:
    # APIcast's "$1" is literal text in Python replacements; \1 is the group.
    config = UrlRewriteConfig.model_validate({"commands": [{"regex": "(a)", "replace": "$1"}]})
    assert config.commands[0].replace == "$1"


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0xFF), max_size=50))
def test_result_always_starts_with_a_slash(path: str) -> None:
    chain = PolicyChain.build(
        [{"url_rewrite": {"commands": [{"regex": "^/*", "replace": "", "global": True}]}}]
    )
    exchange = Exchange(Request("GET", b"/", "/" + path, "", Headers()), 0.0)
    chain.rewrite(exchange)
    assert exchange.route_path.startswith("/")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"commands": [{"regex": "(", "replace": "/"}]}, "invalid regular expression '\\('"),
        ({"commands": [{"regex": "[a-", "replace": "/"}]}, "invalid regular expression"),
        ({"commands": [{"regex": "a", "replace": r"\1"}]}, "invalid replacement"),
        ({"commands": [{"regex": "(a)", "replace": r"\g<name>"}]}, "invalid replacement"),
        ({"commands": [{"regex": "", "replace": "/"}]}, "at least 1 character"),
        ({"commands": [{"regex": "a"}]}, "replace\n  Field required"),
        ({"commands": []}, "at least 1 item"),
        ({}, "commands\n  Field required"),
        ({"commands": [{"regex": "a", "replace": "b", "methods": ["FETCH"]}]}, "Input should be"),
        ({"commands": [{"regex": "a", "replace": "b", "methods": []}]}, "at least 1 item"),
        ({"commands": [{"regex": "a", "replace": "b", "op": "gsub"}]}, "Extra inputs"),
        ({"commands": [{"regex": "a", "replace": "b", "break": "sometimes"}]}, "valid boolean"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UrlRewriteConfig.model_validate(config)
    with pytest.raises(PolicyError, match=r"policies\[0\] url_rewrite: "):
        PolicyChain.build([{"url_rewrite": config}])


def test_invalid_regex_message_points_at_the_command() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyChain.build(
            [
                {
                    "url_rewrite": {
                        "commands": [
                            {"regex": "^/ok", "replace": "/"},
                            {"regex": "(?P<x", "replace": "/"},
                        ]
                    }
                }
            ]
        )
    assert "commands.1.regex: invalid regular expression '(?P<x'" in str(caught.value)
