from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel

from meshgate.policies import REGISTRY, Policy, PolicyChain, PolicyConfig, PolicyError, schemas
from meshgate.proxy import Exchange, Headers, Response, problem


class Recorder(Policy):
    """Appends its tag to a shared journal in every phase; answers when told to."""

    name: ClassVar[str] = "recorder"

    def __init__(self, tag: str, journal: list[str], answer_in: str = "") -> None:
        super().__init__(PolicyConfig())
        self.tag, self.journal, self.answer_in = tag, journal, answer_in

    def rewrite(self, exchange: Exchange) -> Response | None:
        self.journal.append(f"rewrite:{self.tag}")
        return problem(418, self.tag) if self.answer_in == "rewrite" else None

    def access(self, exchange: Exchange) -> Response | None:
        self.journal.append(f"access:{self.tag}")
        return problem(418, self.tag) if self.answer_in == "access" else None

    def response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        self.journal.append(f"response:{self.tag}")
        headers.add("x-order", self.tag)

    def log(self, exchange: Exchange) -> None:
        self.journal.append(f"log:{self.tag}")
        if self.answer_in == "log-raises":
            raise RuntimeError("boom")


class RewriteOnly(Policy):
    name: ClassVar[str] = "rewrite_only"

    def rewrite(self, exchange: Exchange) -> Response | None:
        exchange.route_path += "/seen"
        return None


def test_registry_names_match_policies_and_schemas() -> None:
    assert set(REGISTRY) == {
        "cors",
        "headers",
        "ip_filter",
        "maintenance",
        "request_size_limit",
        "url_rewrite",
    }
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert issubclass(cls.Config, PolicyConfig)
        # Every schema is exportable as JSON Schema for the snapshot's documentation.
        assert cls.Config.model_json_schema()["type"] == "object"
    assert schemas() == {name: cls.Config for name, cls in REGISTRY.items()}


def test_all_phases_run_in_config_order(make_exchange) -> None:
    journal: list[str] = []
    chain = PolicyChain([Recorder("a", journal), Recorder("b", journal)])
    exchange = make_exchange()
    headers = Headers()
    assert chain.rewrite(exchange) is None
    assert chain.access(exchange) is None
    chain.response(exchange, 200, headers)
    chain.log(exchange)
    assert journal == [
        "rewrite:a",
        "rewrite:b",
        "access:a",
        "access:b",
        "response:a",
        "response:b",
        "log:a",
        "log:b",
    ]
    assert headers.get_all("x-order") == ["a", "b"]


@pytest.mark.parametrize("phase", ["rewrite", "access"])
def test_first_answer_ends_the_phase(make_exchange, phase: str) -> None:
    journal: list[str] = []
    chain = PolicyChain(
        [Recorder("a", journal), Recorder("b", journal, answer_in=phase), Recorder("c", journal)]
    )
    answer = getattr(chain, phase)(make_exchange())
    assert answer is not None and answer.status == 418
    assert b'"title": "b"' in answer.body
    assert journal == [f"{phase}:a", f"{phase}:b"]


def test_only_overriding_policies_are_called(make_exchange) -> None:
    policy = RewriteOnly(PolicyConfig())
    chain = PolicyChain([policy])
    assert chain._rewrite == (policy.rewrite,)
    assert chain._access == chain._response == chain._log == ()
    exchange = make_exchange(path="/a")
    assert chain.rewrite(exchange) is None
    assert exchange.route_path == "/a/seen"


def test_empty_chain_does_nothing(make_exchange) -> None:
    chain = PolicyChain.build([])
    exchange = make_exchange(path="/x")
    headers = Headers([(b"a", b"1")])
    assert len(chain) == 0
    assert chain.rewrite(exchange) is None and chain.access(exchange) is None
    chain.response(exchange, 200, headers)
    chain.log(exchange)
    assert exchange.route_path == "/x" and list(headers) == [("a", "1")]


def test_a_failing_log_phase_does_not_stop_the_others(make_exchange, caplog) -> None:
    journal: list[str] = []
    chain = PolicyChain([Recorder("a", journal, answer_in="log-raises"), Recorder("b", journal)])
    chain.log(make_exchange())
    assert journal == ["log:a", "log:b"]
    assert "policy log phase failed" in caplog.text


def test_build_instantiates_in_order_and_allows_repeats() -> None:
    chain = PolicyChain.build(
        [
            {"headers": {"request": {"set": {"x-a": "1"}}}},
            {"cors": {}},
            {"headers": {"request": {"set": {"x-a": "2"}}}},
        ]
    )
    assert [p.name for p in chain.policies] == ["headers", "cors", "headers"]
    assert repr(chain) == "PolicyChain([headers, cors, headers])"


def test_build_accepts_a_null_config_as_defaults() -> None:
    chain = PolicyChain.build([{"cors": None}])
    assert chain.policies[0].name == "cors"


def test_build_chain_runs_built_policies(make_exchange) -> None:
    chain = PolicyChain.build(
        [
            {"url_rewrite": {"commands": [{"regex": "^/old", "replace": "/new"}]}},
            {"headers": {"request": {"set": {"x-path-rewritten": "yes"}}}},
            {"request_size_limit": {"max_bytes": 10}},
        ]
    )
    exchange = make_exchange(path="/old/items", content_length=5)
    assert chain.rewrite(exchange) is None
    assert exchange.route_path == "/new/items"
    assert exchange.request.headers.get("x-path-rewritten") == "yes"
    assert exchange.max_body_size == 10


def test_an_earlier_answer_skips_later_rewrites(make_exchange) -> None:
    chain = PolicyChain.build(
        [
            {"maintenance": {}},
            {"url_rewrite": {"commands": [{"regex": "^/", "replace": "/v2/"}]}},
        ]
    )
    exchange = make_exchange(path="/a")
    answer = chain.rewrite(exchange)
    assert answer is not None and answer.status == 503
    assert exchange.route_path == "/a"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"nope": {}}], "policies[0]: unknown policy 'nope'; known: cors, headers, ip_filter"),
        ([{"cors": {}}, {"cors": {}, "headers": {}}], "policies[1]: name exactly one policy"),
        ([{}], "policies[0]: name exactly one policy"),
        ([{"cors": {"bogus": 1}}], "policies[0] cors: bogus: Extra inputs are not permitted"),
        (
            [{"cors": {}}, {"request_size_limit": {"max_bytes": -1}}],
            "policies[1] request_size_limit: max_bytes: Input should be greater than or equal to 0",
        ),
        (
            [{"request_size_limit": {}}],
            "policies[0] request_size_limit: max_bytes: Field required",
        ),
        (
            [{"url_rewrite": {"commands": [{"regex": "(", "replace": "/"}]}}],
            "policies[0] url_rewrite: commands.0.regex: invalid regular expression '('",
        ),
        (
            [{"ip_filter": {"deny": ["10.0.0.0/33"]}}],
            "policies[0] ip_filter: deny: '10.0.0.0/33' is not an IP address or CIDR block",
        ),
        (
            [{"maintenance": {"status": "soon"}}],
            "policies[0] maintenance: status: Input should be a valid integer",
        ),
    ],
)
def test_build_errors_name_the_entry_and_the_field(entries, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyChain.build(entries)
    assert str(caught.value).startswith(message)
    assert "Value error," not in str(caught.value)


def test_policy_error_is_a_value_error() -> None:
    # So a pydantic validator that builds a chain reports it as a validation error.
    assert issubclass(PolicyError, ValueError)


def test_build_reports_every_problem_of_an_entry() -> None:
    with pytest.raises(PolicyError) as caught:
        PolicyChain.build([{"cors": {"max_age": -1, "allow_credentials": "maybe"}}])
    text = str(caught.value)
    assert "max_age: Input should be greater than or equal to 0" in text
    assert "allow_credentials: Input should be a valid boolean" in text


def test_configs_are_frozen() -> None:
    config = schemas()["request_size_limit"].model_validate({"max_bytes": 1})
    assert isinstance(config, BaseModel)
    with pytest.raises(ValueError):
        config.max_bytes = 2  # type: ignore[attr-defined]
