from __future__ import annotations

import pytest
from pydantic import ValidationError

from meshgate.policies import PolicyChain, PolicyError
from meshgate.policies.cors import CorsConfig
from meshgate.proxy import Headers, problem

APP = "https://app.example.com"


def preflight(make_exchange, origin: str = APP, method: str = "PUT", headers: str = ""):
    fields = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if headers:
        fields.append(("Access-Control-Request-Headers", headers))
    return make_exchange("OPTIONS", "/items", fields)


def vary(headers: Headers) -> list[str]:
    return [t.strip() for v in headers.get_all("vary") for t in v.split(",")]


def test_default_preflight_allows_any_origin_without_a_key(chain, make_exchange) -> None:
    answer = chain("cors").rewrite(preflight(make_exchange, headers="X-Api-Key, content-type"))
    assert answer is not None and answer.status == 204 and answer.body == b""
    h = answer.headers
    assert h.get("access-control-allow-origin") == "*"
    assert h.get("access-control-allow-methods") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    # Unset allow_headers echoes what the browser asked for.
    assert h.get("access-control-allow-headers") == "X-Api-Key, content-type"
    assert "Access-Control-Request-Headers" in vary(h)
    assert "access-control-allow-credentials" not in h
    assert "access-control-max-age" not in h
    assert "Origin" not in vary(h)


def test_listed_origin_is_echoed_and_varies(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=[APP, "http://localhost:3000"])
    answer = policy.rewrite(preflight(make_exchange, origin="http://localhost:3000"))
    assert answer is not None and answer.status == 204
    assert answer.headers.get("access-control-allow-origin") == "http://localhost:3000"
    assert "Origin" in vary(answer.headers)


def test_origins_match_case_insensitively_but_ports_exactly(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=["https://App.Example.com"])
    ok = policy.rewrite(preflight(make_exchange, origin=APP))
    assert ok is not None and ok.headers.get("access-control-allow-origin") == APP
    other_port = policy.rewrite(preflight(make_exchange, origin=APP + ":8443"))
    assert other_port is not None and other_port.status == 403


def test_disallowed_origin_preflight_is_403_problem(chain, make_exchange, read_problem) -> None:
    answer = chain("cors", allow_origins=[APP]).rewrite(
        preflight(make_exchange, origin="https://evil.example")
    )
    assert answer is not None and answer.status == 403
    assert read_problem(answer)["title"] == "Forbidden"
    assert "access-control-allow-origin" not in answer.headers


def test_configured_methods_headers_and_max_age(chain, make_exchange) -> None:
    policy = chain(
        "cors",
        allow_methods=["get", "POST"],
        allow_headers=["Authorization", "X-Trace"],
        max_age=600,
    )
    answer = policy.rewrite(preflight(make_exchange, headers="x-other"))
    assert answer is not None
    h = answer.headers
    assert h.get("access-control-allow-methods") == "GET, POST"
    assert h.get("access-control-allow-headers") == "authorization, x-trace"
    assert h.get("access-control-max-age") == "600"
    assert "Access-Control-Request-Headers" not in vary(h)


def test_max_age_zero_is_sent(chain, make_exchange) -> None:
    answer = chain("cors", max_age=0).rewrite(preflight(make_exchange))
    assert answer is not None and answer.headers.get("access-control-max-age") == "0"


def test_empty_allow_headers_sends_none(chain, make_exchange) -> None:
    answer = chain("cors", allow_headers=[]).rewrite(preflight(make_exchange, headers="x-a"))
    assert answer is not None and "access-control-allow-headers" not in answer.headers


def test_wildcards_without_credentials_are_literal(chain, make_exchange) -> None:
    policy = chain("cors", allow_methods=["*"], allow_headers=["*"])
    answer = policy.rewrite(preflight(make_exchange, method="PURGE", headers="x-a"))
    assert answer is not None
    assert answer.headers.get("access-control-allow-methods") == "*"
    assert answer.headers.get("access-control-allow-headers") == "*"


def test_credentials_echo_origin_method_and_headers_instead_of_wildcards(
    chain, make_exchange
) -> None:
    policy = chain("cors", allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    answer = policy.rewrite(preflight(make_exchange, method="PURGE", headers="X-A, x-b"))
    assert answer is not None and answer.status == 204
    h = answer.headers
    assert h.get("access-control-allow-origin") == APP
    assert h.get("access-control-allow-credentials") == "true"
    assert h.get("access-control-allow-methods") == "PURGE"
    assert h.get("access-control-allow-headers") == "X-A, x-b"
    assert {"Origin", "Access-Control-Request-Headers"} <= set(vary(h))


def test_options_without_request_method_is_not_a_preflight(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=[APP])
    plain = make_exchange("OPTIONS", "/", [("Origin", "https://evil.example")])
    assert policy.rewrite(plain) is None
    no_origin = make_exchange("OPTIONS", "/", [("Access-Control-Request-Method", "GET")])
    assert policy.rewrite(no_origin) is None
    get = make_exchange("GET", "/", [("Origin", APP), ("Access-Control-Request-Method", "GET")])
    assert policy.rewrite(get) is None


def test_actual_response_gets_origin_and_expose_headers(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=[APP], expose_headers=["X-RateLimit-Remaining", "ETag"])
    exchange = make_exchange("GET", "/items", [("Origin", APP)])
    headers = Headers()
    headers.add("vary", "Accept-Encoding")
    headers.add("access-control-allow-origin", "*")  # the upstream's own, overridden
    policy.response(exchange, 200, headers)
    assert headers.get_all("access-control-allow-origin") == [APP]
    assert headers.get("access-control-expose-headers") == "x-ratelimit-remaining, etag"
    assert vary(headers) == ["Accept-Encoding", "Origin"]
    assert "access-control-allow-credentials" not in headers


def test_vary_is_not_duplicated(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=[APP])
    exchange = make_exchange("GET", "/", [("Origin", APP)])
    headers = Headers()
    headers.add("vary", "origin, accept")
    policy.response(exchange, 200, headers)
    assert headers.get_all("vary") == ["origin, accept"]
    star = Headers()
    star.add("vary", "*")
    policy.response(exchange, 200, star)
    assert star.get_all("vary") == ["*"]


def test_wildcard_actual_response(chain, make_exchange) -> None:
    policy = chain("cors")
    headers = Headers()
    policy.response(make_exchange("GET", "/", [("Origin", APP)]), 200, headers)
    assert headers.get("access-control-allow-origin") == "*"
    assert "vary" not in headers
    # Not a CORS request: nothing to say.
    bare = Headers()
    policy.response(make_exchange("GET", "/"), 200, bare)
    assert len(bare) == 0


def test_wildcard_replaces_the_upstreams_origin_fields_and_adds_expose(
    chain, make_exchange
) -> None:
    policy = chain("cors", expose_headers=["X-Total"])
    headers = Headers()
    headers.add("Access-Control-Allow-Origin", "https://other.example")
    headers.add("content-type", "text/plain")
    headers.add("Access-Control-Allow-Origin", "https://third.example")
    policy.response(make_exchange("GET", "/", [("Origin", APP)]), 200, headers)
    assert headers.get_all("access-control-allow-origin") == ["*"]
    assert headers.raw()[0] == (b"access-control-allow-origin", b"*")
    assert headers.get("access-control-expose-headers") == "x-total"


def test_wildcard_actual_response_to_repeated_origin_fields_has_no_cors_fields(
    chain, make_exchange
) -> None:
    headers = Headers()
    exchange = make_exchange("GET", "/", [("Origin", APP), ("Origin", APP)])
    chain("cors").response(exchange, 200, headers)
    assert len(headers) == 0


def test_credentials_never_send_a_wildcard_origin(chain, make_exchange) -> None:
    policy = chain("cors", allow_credentials=True)
    headers = Headers()
    policy.response(make_exchange("GET", "/", [("Origin", APP)]), 200, headers)
    assert headers.get("access-control-allow-origin") == APP
    assert headers.get("access-control-allow-credentials") == "true"
    assert "Origin" in vary(headers)


def test_disallowed_or_missing_origin_gets_no_cors_fields_but_varies(chain, make_exchange) -> None:
    policy = chain("cors", allow_origins=[APP], allow_credentials=True)
    for exchange in (
        make_exchange("GET", "/", [("Origin", "https://evil.example")]),
        make_exchange("GET", "/"),
    ):
        headers = Headers()
        policy.response(exchange, 200, headers)
        assert "access-control-allow-origin" not in headers
        assert "access-control-allow-credentials" not in headers
        assert vary(headers) == ["Origin"]


def test_gateway_answers_like_401_carry_cors_fields(make_exchange) -> None:
    chain = PolicyChain.build([{"cors": {"allow_origins": [APP]}}])
    exchange = make_exchange("GET", "/items", [("Origin", APP)])
    answer = problem(401, "Unauthorized")
    chain.response(exchange, 401, answer.headers)
    assert answer.headers.get("access-control-allow-origin") == APP


def test_answered_preflight_is_not_decorated_twice(make_exchange) -> None:
    chain = PolicyChain.build([{"cors": {"allow_origins": [APP], "expose_headers": ["x-a"]}}])
    exchange = preflight(make_exchange)
    answer = chain.rewrite(exchange)
    assert answer is not None
    chain.response(exchange, answer.status, answer.headers)
    assert answer.headers.get_all("access-control-allow-origin") == [APP]
    assert vary(answer.headers).count("Origin") == 1
    assert "access-control-expose-headers" not in answer.headers


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "https://app.example.com/",
        "https://app.example.com/path",
        "app.example.com",
        "https://",
        "https://app.example.com\x00",
        "https://app.example.com\n",
        "https://app.example.com\r\nset-cookie: a=b",
        "https://caf\xe9.example",
        "https://user@app.example.com",
        "https://" + "a" * 100_000 + ".example",
        "",
    ],
)
def test_malformed_origins_are_never_echoed(chain, make_exchange, origin: str) -> None:
    policy = chain("cors", allow_credentials=True)  # "*": echoes any well-formed origin
    answer = policy.rewrite(preflight(make_exchange, origin=origin))
    is_huge = len(origin) > 1000
    if is_huge:
        # Long but well-formed: echoed verbatim, the header limit is the engine's business.
        assert answer is not None and answer.status == 204
        return
    assert answer is not None and answer.status == 403
    headers = Headers()
    policy.response(make_exchange("GET", "/", [("Origin", origin)]), 200, headers)
    assert "access-control-allow-origin" not in headers


def test_wildcard_without_credentials_answers_star_even_to_null(chain, make_exchange) -> None:
    answer = chain("cors").rewrite(preflight(make_exchange, origin="null"))
    assert answer is not None and answer.headers.get("access-control-allow-origin") == "*"


def test_repeated_origin_fields_are_refused(chain, make_exchange) -> None:
    exchange = make_exchange(
        "OPTIONS",
        "/",
        [("Origin", APP), ("Origin", APP), ("Access-Control-Request-Method", "GET")],
    )
    answer = chain("cors", allow_origins=[APP]).rewrite(exchange)
    assert answer is not None and answer.status == 403


def test_hostile_request_headers_list_echoes_only_tokens(chain, make_exchange) -> None:
    requested = ", ".join(["x-ok", "bad name", "caf\xe9", "x\x00y", ""] + ["x-many"] * 20_000)
    answer = chain("cors").rewrite(preflight(make_exchange, headers=requested))
    assert answer is not None
    echoed = answer.headers.get("access-control-allow-headers") or ""
    parts = echoed.split(", ")
    assert parts[0] == "x-ok" and set(parts) == {"x-ok", "x-many"}
    assert len(parts) == 20_001


def test_hostile_request_method_is_not_echoed(chain, make_exchange) -> None:
    policy = chain("cors", allow_credentials=True, allow_methods=["*"])
    answer = policy.rewrite(preflight(make_exchange, method="GET\r\nX: y"))
    assert answer is not None and "access-control-allow-methods" not in answer.headers


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"allow_origins": ["https://a.example/"]}, "is not an origin"),
        ({"allow_origins": ["a.example"]}, "is not an origin"),
        ({"allow_origins": ["null"]}, "is not an origin"),
        ({"allow_origins": ["https://*.example.com"]}, "is not an origin"),
        ({"allow_origins": ["https://a.example\n"]}, "is not an origin"),
        ({"allow_headers": ["x-a\n"]}, "not a valid header name"),
        ({"allow_origins": []}, "at least 1 item"),
        ({"allow_methods": ["GE T"]}, "not a valid header name"),
        ({"allow_headers": ["x y"]}, "not a valid header name"),
        ({"expose_headers": ["x:y"]}, "not a valid header name"),
        ({"max_age": -1}, "greater than or equal to 0"),
        ({"allow_credentials": True, "expose_headers": ["*"]}, 'expose_headers "*"'),
        ({"allow_origin": ["*"]}, "Extra inputs are not permitted"),
    ],
)
def test_bad_configs(config, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CorsConfig.model_validate(config)
    with pytest.raises(PolicyError, match="policies\\[0\\] cors: "):
        PolicyChain.build([{"cors": config}])


def test_ipv6_origin_is_accepted() -> None:
    config = CorsConfig.model_validate({"allow_origins": ["http://[::1]:8080"]})
    assert config.allow_origins == ["http://[::1]:8080"]
