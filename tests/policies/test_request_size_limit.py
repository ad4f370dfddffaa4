from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.request_size_limit import RequestSizeLimitConfig


def test_declared_length_over_the_limit_is_413(chain, make_exchange, read_problem) -> None:
    exchange = make_exchange("POST", content_length=1025)
    answer = chain("request_size_limit", max_bytes=1024).rewrite(exchange)
    assert answer is not None and answer.status == 413
    doc = read_problem(answer)
    assert doc["title"] == "Content Too Large" and doc["max_bytes"] == 1024
    assert doc["detail"] == "the request body is 1025 bytes; the limit is 1024"


def test_length_at_the_limit_passes_and_hands_the_limit_on(chain, make_exchange) -> None:
    exchange = make_exchange("POST", content_length=1024)
    assert chain("request_size_limit", max_bytes=1024).rewrite(exchange) is None
    assert exchange.max_body_size == 1024


def test_chunked_body_is_left_to_the_engine(chain, make_exchange) -> None:
    exchange = make_exchange("POST", chunked=True)
    assert chain("request_size_limit", max_bytes=10).rewrite(exchange) is None
    assert exchange.max_body_size == 10


@pytest.mark.parametrize(("existing", "expected"), [(None, 100), (50, 50), (500, 100), (0, 0)])
def test_the_smaller_limit_wins(chain, make_exchange, existing, expected: int) -> None:
    exchange = make_exchange()
    exchange.max_body_size = existing
    chain("request_size_limit", max_bytes=100).rewrite(exchange)
    assert exchange.max_body_size == expected


def test_zero_allows_no_body(chain, make_exchange) -> None:
    policy = chain("request_size_limit", max_bytes=0)
    assert policy.rewrite(make_exchange("GET", content_length=0)) is None
    answer = policy.rewrite(make_exchange("POST", content_length=1))
    assert answer is not None and answer.status == 413


def test_huge_declared_length(chain, make_exchange) -> None:
    answer = chain("request_size_limit", max_bytes=1).rewrite(
        make_exchange("POST", content_length=2**63)
    )
    assert answer is not None and answer.status == 413


def test_two_limits_in_a_chain_keep_the_smaller(make_exchange) -> None:
    chain = PolicyChain.build(
        [{"request_size_limit": {"max_bytes": 10}}, {"request_size_limit": {"max_bytes": 100}}]
    )
    exchange = make_exchange("POST", chunked=True)
    chain.rewrite(exchange)
    assert exchange.max_body_size == 10


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "max_bytes\n  Field required"),
        ({"max_bytes": -1}, "greater than or equal to 0"),
        ({"max_bytes": 1.5}, "valid integer"),
        ({"max_bytes": "lots"}, "valid integer"),
        ({"max_bytes": 1, "per_route": True}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RequestSizeLimitConfig.model_validate(config)
    with pytest.raises(PolicyError, match=r"policies\[0\] request_size_limit: "):
        PolicyChain.build([{"request_size_limit": config}])
