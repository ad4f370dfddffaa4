from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.headers import HeadersConfig
from meshgate.proxy import Headers


def test_request_remove_set_add(chain, make_exchange) -> None:
    policy = chain(
        "headers",
        request={
            "remove": ["X-Debug"],
            "set": {"X-Env": "prod"},
            "add": {"X-Tag": ["a", "b"], "Via": "meshgate"},
        },
    )
    exchange = make_exchange(
        headers=[
            ("X-Debug", "1"),
            ("x-debug", "2"),
            ("X-Env", "dev"),
            ("X-Env", "test"),
            ("X-Tag", "client"),
        ]
    )
    assert policy.rewrite(exchange) is None
    h = exchange.request.headers
    assert "x-debug" not in h
    assert h.get_all("x-env") == ["prod"]
    assert h.get_all("x-tag") == ["client", "a", "b"]
    assert h.get_all("via") == ["meshgate"]


def test_edits_apply_remove_then_set_then_add(chain, make_exchange) -> None:
    policy = chain(
        "headers",
        request={"add": {"x-a": "added"}, "set": {"x-a": "set"}, "remove": ["x-a"]},
    )
    exchange = make_exchange(headers=[("x-a", "client")])
    policy.rewrite(exchange)
    assert exchange.request.headers.get_all("x-a") == ["set", "added"]


def test_response_edits(chain, make_exchange) -> None:
    policy = chain(
        "headers",
        response={"remove": ["Server"], "set": {"Cache-Control": "no-store"}, "add": {"X-A": "1"}},
    )
    headers = Headers()
    headers.add("server", "upstream/1.0")
    headers.add("cache-control", "max-age=60")
    policy.response(make_exchange(), 200, headers)
    assert "server" not in headers
    assert headers.get_all("cache-control") == ["no-store"]
    assert headers.get("x-a") == "1"


def test_request_edits_leave_responses_alone_and_back(chain, make_exchange) -> None:
    only_request = chain("headers", request={"set": {"x-a": "1"}})
    headers = Headers()
    only_request.response(make_exchange(), 200, headers)
    assert len(headers) == 0
    only_response = chain("headers", response={"set": {"x-a": "1"}})
    exchange = make_exchange()
    only_response.rewrite(exchange)
    assert len(exchange.request.headers) == 0


def test_placeholders(chain, make_exchange) -> None:
    policy = chain(
        "headers",
        request={"set": {"X-Request-Id": "{request_id}", "X-Real-IP": "{client_ip}"}},
        response={"add": {"X-Trace": "id={request_id} ip={client_ip} {other} {{x}}"}},
    )
    exchange = make_exchange(client_ip="2001:db8::7", request_id="abc-123")
    policy.rewrite(exchange)
    assert exchange.request.headers.get("x-request-id") == "abc-123"
    assert exchange.request.headers.get("x-real-ip") == "2001:db8::7"
    headers = Headers()
    policy.response(exchange, 200, headers)
    # Anything else in braces stays literal.
    assert headers.get("x-trace") == "id=abc-123 ip=2001:db8::7 {other} {{x}}"


def test_runs_on_local_answers_through_the_chain(make_exchange) -> None:
    chain = PolicyChain.build(
        [{"maintenance": {}}, {"headers": {"response": {"set": {"x-served-by": "gw"}}}}]
    )
    exchange = make_exchange()
    answer = chain.rewrite(exchange)
    assert answer is not None
    chain.response(exchange, answer.status, answer.headers)
    assert answer.headers.get("x-served-by") == "gw"


def test_latin1_values_round_trip(chain, make_exchange) -> None:
    policy = chain("headers", request={"set": {"x-city": "Z\xfcrich"}})
    exchange = make_exchange()
    policy.rewrite(exchange)
    assert exchange.request.headers.raw()[-1] == (b"x-city", b"Z\xfcrich")


def test_huge_values_and_many_fields(chain, make_exchange) -> None:
    big = "v" * 1_000_000
    policy = chain("headers", request={"remove": ["x-big"], "set": {"x-echo": big}})
    exchange = make_exchange(headers=[("x-big", big)] * 100 + [("x-keep", "1")])
    policy.rewrite(exchange)
    h = exchange.request.headers
    assert "x-big" not in h and h.get("x-keep") == "1" and h.get("x-echo") == big


def test_names_are_case_insensitive(chain, make_exchange) -> None:
    policy = chain("headers", request={"remove": ["AUTHORIZATION"]})
    exchange = make_exchange(headers=[("Authorization", "Bearer x")])
    policy.rewrite(exchange)
    assert "authorization" not in exchange.request.headers


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "nothing to do"),
        ({"request": {}}, "nothing to do"),
        ({"request": {"set": {"x a": "1"}}}, "'x a' is not a valid header name"),
        ({"request": {"set": {"x-a:": "1"}}}, "is not a valid header name"),
        ({"request": {"add": {"": "1"}}}, "is not a valid header name"),
        ({"request": {"set": {"x-a": "1\r\nx-b: 2"}}}, "without control characters"),
        ({"request": {"add": {"x-a": ["ok", "bad\n"]}}}, "without control characters"),
        ({"response": {"set": {"x-a": "\u2603"}}}, "Latin-1"),
        ({"request": {"set": {"Content-Length": "1"}}}, "managed by the proxy"),
        ({"request": {"remove": ["transfer-encoding"]}}, "managed by the proxy"),
        ({"response": {"add": {"Connection": "close"}}}, "managed by the proxy"),
        ({"request": {"set": {"X-A": "1", "x-a": "2"}}}, "differ only in case"),
        ({"request": {"add": {"X-A": "1", "x-a": "2"}}}, "named twice"),
        ({"request": {"set": {"x-a": 1}}}, "valid string"),
        ({"request": {"append": {"x-a": "1"}}}, "Extra inputs are not permitted"),
        ({"requests": {"set": {"x-a": "1"}}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HeadersConfig.model_validate(config)
    with pytest.raises(PolicyError, match=r"policies\[0\] headers: "):
        PolicyChain.build([{"headers": config}])


def test_error_names_the_field() -> None:
    with pytest.raises(PolicyError, match=r"request\.set: 'Content-Length' is managed"):
        PolicyChain.build([{"headers": {"request": {"set": {"Content-Length": "1"}}}}])
