"""Loading valid configurations and the errors reported for invalid ones, path by path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from config_cases import EXAMPLE, POLICIES, errors_of, example
from pydantic import BaseModel

from meshgate.config import (
    ApiKeyAuth,
    AppIdKeyAuth,
    Config,
    ConfigError,
    JwtAuth,
    NoAuth,
    load_config,
    parse_config,
)

PERIODS = "'minute', 'hour', 'day', 'week', 'month', 'year', 'eternity'"
AUTH_TYPES = "'api_key', 'app_id_key', 'jwt', 'none', 'mtls'"


def product(**changes: Any) -> dict[str, Any]:
    """A minimal valid product with some fields replaced."""
    base: dict[str, Any] = {
        "name": "p",
        "backend": "http://127.0.0.1:9001",
        "auth": {"type": "api_key"},
    }
    return {**base, **changes}


def test_example_loads_as_written(tmp_path: Any) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    assert config == parse_config(EXAMPLE) == load_config(str(path))
    assert (config.listen, config.admin_listen) == ("127.0.0.1:8080", "127.0.0.1:8081")
    assert config.limits.backend == "memory"
    (echo,) = config.products
    assert (echo.name, echo.hosts, echo.path_prefix) == ("echo", ["*"], "/echo")
    assert echo.backend == "http://127.0.0.1:9001"
    assert echo.auth == ApiKeyAuth(type="api_key", header="X-API-Key")
    assert [(m.name, m.parent) for m in echo.metrics] == [("hits", None), ("search", "hits")]
    assert [(r.method, r.pattern, r.metric, r.last) for r in echo.mapping_rules] == [
        ("GET", "/search", "search", True),
        ("ANY", "/", "hits", False),
    ]
    (basic,) = echo.plans
    assert [(x.metric, x.period, x.value) for x in basic.limits] == [
        ("hits", "minute", 5),
        ("search", "day", 1000),
    ]
    assert echo.policies == [{"cors": {"allow_origins": ["*"]}}]
    assert [(a.id, a.plan, a.keys) for a in echo.applications] == [("app1", "basic", ["k1"])]


def test_example_loads_with_policy_schemas_and_keeps_policies_as_written() -> None:
    config = parse_config(EXAMPLE, policy_schemas=POLICIES)
    assert config == parse_config(EXAMPLE)
    assert type(config) is Config
    assert config.products[0].policies == [{"cors": {"allow_origins": ["*"]}}]


def test_json_is_accepted_and_means_the_same() -> None:
    assert parse_config(json.dumps(example())) == parse_config(EXAMPLE)
    assert parse_config(json.dumps(example()).encode()) == parse_config(EXAMPLE.encode())


def test_json_numbers_with_exponents_are_numbers() -> None:
    text = '{"timeouts": {"client_body": 1e-05, "shutdown_grace": 1E+3}, "upstream_keepalive": 1}'
    config = parse_config(text)
    assert (config.timeouts.client_body, config.timeouts.shutdown_grace) == (1e-05, 1000.0)
    assert parse_config("timeouts: {client_body: 2.5e1}").timeouts.client_body == 25.0
    assert errors_of("limits: {key_prefix: 1e5}") == [
        "limits.key_prefix: must be a string (put the value in quotes)"
    ]


def test_empty_mapping_is_all_defaults() -> None:
    assert parse_config("{}") == Config()


def test_each_auth_type_loads() -> None:
    data = {
        "products": [
            product(name="a", auth={"type": "api_key", "query": "key"}),
            product(name="b", auth={"type": "app_id_key"}),
            product(
                name="c", auth={"type": "jwt", "keys": [{"secret": "s", "algorithm": "HS256"}]}
            ),
            product(
                name="d",
                auth={"type": "none", "default_application": "anon"},
                plans=[{"name": "free"}],
                applications=[{"id": "anon", "plan": "free"}],
            ),
        ]
    }
    auths = [p.auth for p in parse_config(json.dumps(data)).products]
    assert [type(a) for a in auths] == [ApiKeyAuth, AppIdKeyAuth, JwtAuth, NoAuth]
    assert (auths[0].header, auths[0].query) == (None, "key")


def test_api_key_auth_defaults_to_header_and_query_however_built() -> None:
    loaded = parse_config(json.dumps({"products": [product()]})).products[0].auth
    assert loaded == ApiKeyAuth(type="api_key")
    assert (loaded.header, loaded.query) == ("X-API-Key", "user_key")


def test_literal_error_names_every_choice_at_its_path() -> None:
    data = example()
    data["products"][0]["plans"].append(
        {"name": "pro", "limits": [{"metric": "hits", "period": "fortnight", "value": 1}]}
    )
    assert errors_of(data) == [f"products[0].plans[1].limits[0].period: must be one of {PERIODS}"]


def test_missing_field_is_required() -> None:
    data = example()
    del data["products"][0]["auth"]
    assert errors_of(data) == ["products[0].auth: is required"]


def test_backend_or_backends() -> None:
    data = example()
    del data["products"][0]["backend"]
    assert errors_of(data) == ["products[0]: give either backend or backends (not both)"]
    data["products"][0]["backends"] = [
        {"path": "/", "url": "http://127.0.0.1:9001"},
        {"path": "/v2/", "url": "ftp://x"},
        {"path": "/", "url": "http://127.0.0.1:9002"},
    ]
    assert errors_of(data) == [
        "products[0].backends[1].url: must be an http:// or https:// URL, e.g. http://127.0.0.1:9001"
    ]
    del data["products"][0]["backends"][1]
    assert errors_of(data) == ["products[0]: two backends at the same path"]


def test_key_hashes_need_a_salt() -> None:
    data = example()
    data["products"][0]["applications"][0]["key_hashes"] = ["sha256:" + "ab" * 32]
    assert errors_of(data) == [
        "products[0]: applications carry key_hashes: give the product's key_salt"
    ]
    data["products"][0]["applications"][0]["key_hashes"] = ["md5:00"]
    assert errors_of(data)[0].startswith("products[0].applications[0].key_hashes[0]:")


def test_unknown_field_lists_the_allowed_ones() -> None:
    data = example()
    data["products"][0]["plans"][0]["limits"][0]["window"] = 60
    data["limitz"] = {}
    assert errors_of(data) == [
        "products[0].plans[0].limits[0].window: unknown field (allowed: metric, period, value)",
        "limitz: unknown field (allowed: listen, tls, admin_listen, limits, usage, timeouts, "
        "max_header_size, access_log, http2, upstream_keepalive, tracing, identity, "
        "consumer_token, products, version)",
    ]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("listen",), 8080, "must be a string (put the value in quotes)"),
        (("products", 0, "name"), True, "must be a string (put the value in quotes)"),
        (("products", 0, "hosts", 0), None, "must be a string"),
        (("products", 0, "plans", 0, "limits", 0, "value"), "5", "must be an integer"),
        (("products", 0, "plans", 0, "limits", 0, "value"), 2.5, "must be an integer"),
        (("products", 0, "plans", 0, "limits", 0, "value"), True, "must be an integer"),
        (("timeouts",), {"client_header": "10s"}, "must be a number"),
        (("access_log",), "yes", "must be true or false"),
        (("products", 0, "hosts"), "*", "must be a list"),
        (("products", 0, "plans", 0), ["basic"], "must be a mapping"),
        (("limits",), "memory", "must be a mapping"),
        (("products", 0, "policies", 0, "cors"), [], "must be a mapping"),
    ],
)
def test_wrong_types(path: tuple[Any, ...], value: Any, message: str) -> None:
    data = example()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    where = ".".join(str(p) for p in path).replace(".0", "[0]")
    if path == ("timeouts",):
        where = "timeouts.client_header"
    assert errors_of(data) == [f"{where}: {message}"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"listen": "localhost"}, "listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080"),
        (
            {"listen": "0.0.0.0:70000"},
            "listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        ),
        ({"max_header_size": 10}, "max_header_size: must be at least 1024"),
        ({"upstream_keepalive": -1}, "upstream_keepalive: must be at least 0"),
        ({"timeouts": {"shutdown_grace": 0}}, "timeouts.shutdown_grace: must be greater than 0"),
        ({"limits": {"backend": "etcd"}}, "limits.backend: must be one of 'memory', 'redis'"),
    ],
)
def test_top_level_values(change: dict[str, Any], error: str) -> None:
    assert errors_of({**example(), **change}) == [error]


def test_product_field_messages() -> None:
    data = {
        "products": [
            product(
                name="bad name",
                path_prefix="echo",
                backend="ftp://example.com",
                mapping_rules=[{"pattern": "search", "metric": "hits", "increment": -1}],
                applications=[{"id": "", "plan": "x"}],
            )
        ]
    }
    assert errors_of(data) == [
        "products[0].name: must start with a letter or digit and hold only letters, digits, "
        "'_', '.' and '-'",
        "products[0].path_prefix: must start with / and hold no empty or .. segments",
        "products[0].backend: must be an http:// or https:// URL, e.g. http://127.0.0.1:9001",
        "products[0].mapping_rules[0].pattern: must start with /",
        "products[0].mapping_rules[0].increment: must be at least 0",
        "products[0].applications[0].id: must not be empty",
        # Said in the same pass, not once the fields are fixed.
        "products[0]: application '' is on unknown plan 'x'",
    ]


def test_auth_type_must_be_known() -> None:
    assert errors_of({"products": [product(auth={"type": "oauth"})]}) == [
        f"products[0].auth.type: must be one of {AUTH_TYPES}"
    ]
    assert errors_of({"products": [product(auth={"header": "X-Key"})]}) == [
        f"products[0].auth.type: is required (one of {AUTH_TYPES})"
    ]
    assert errors_of({"products": [product(auth="api_key")]}) == [
        "products[0].auth: must be a mapping"
    ]
    assert errors_of({"products": [product(auth=None)]}) == ["products[0].auth: must be a mapping"]


def test_auth_tag_is_not_part_of_the_path() -> None:
    data = {
        "products": [
            product(auth={"type": "api_key", "header": 1, "cookie": "k"}),
            product(
                name="j",
                auth={"type": "jwt", "keys": [{"secret": "s", "jwk": {"kty": "oct", "k": "cw"}}]},
            ),
            product(name="k", auth={"type": "jwt", "audience": 5, "jwks_url": "http://x"}),
            product(name="n", auth={"type": "none"}),
        ]
    }
    assert errors_of(data) == [
        "products[0].auth.header: must be a string (put the value in quotes)",
        "products[0].auth.cookie: unknown field (allowed: type, header, query)",
        "products[1].auth.keys[0]: give exactly one of pem, secret or jwk",
        "products[2].auth.audience: must be a string or a list",
        "products[3].auth.default_application: is required",
    ]


def test_cross_references_carry_the_path_of_their_object_one_a_line() -> None:
    data = {
        "products": [
            product(
                metrics=[{"name": "hits"}, {"name": "a", "parent": "nope"}],
                mapping_rules=[{"pattern": "/", "metric": "hit"}],
                plans=[{"name": "basic", "limits": [{"metric": "x", "period": "day", "value": 1}]}],
                applications=[{"id": "x", "plan": "y"}],
            )
        ]
    }
    assert errors_of(data) == [
        "products[0]: metric 'a' has unknown parent 'nope'",
        "products[0]: mapping rule '/' names unknown metric 'hit'",
        "products[0]: plan 'basic' limits unknown metric 'x'",
        "products[0]: application 'x' is on unknown plan 'y'",
    ]


def test_uniqueness_and_cycles() -> None:
    plan = {"name": "b", "limits": [{"metric": "hits", "period": "day", "value": 1}] * 2}
    data = {
        "products": [
            product(
                metrics=[
                    {"name": "hits"},
                    {"name": "a", "parent": "b"},
                    {"name": "b", "parent": "a"},
                    {"name": "c", "parent": "a"},
                ],
                plans=[{"name": "free"}, {"name": "free"}],
                applications=[
                    {"id": "x", "plan": "free", "keys": ["k"]},
                    {"id": "y", "plan": "free", "keys": ["k"]},
                ],
            ),
            product(name="q", plans=[plan]),
            product(name="q"),
        ]
    }
    assert errors_of(data) == [
        "products[0]: metric 'a' is its own ancestor",
        "products[0]: metric 'b' is its own ancestor",
        "products[0]: plan names must be unique: 'free'",
        "products[0]: a key belongs to two applications",
        "products[1].plans[0]: two limits for metric 'hits' and period 'day'",
        "top level: product names must be unique: 'q'",
    ]
    assert errors_of({"products": [product(name="q"), product(name="q")]}) == [
        "top level: product names must be unique: 'q'"
    ]


def test_all_errors_are_reported_in_document_order() -> None:
    data = example()
    data["listen"] = "nowhere"
    data["products"][0]["plans"][0]["limits"][1]["period"] = "fortnight"
    data["products"][0]["applications"][0]["state"] = "paused"
    data["products"].append(product(name="other", auth={"type": "saml"}))
    assert errors_of(data) == [
        "listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
        f"products[0].plans[0].limits[1].period: must be one of {PERIODS}",
        "products[0].applications[0].state: must be one of 'live', 'suspended', 'pending'",
        f"products[1].auth.type: must be one of {AUTH_TYPES}",
    ]


def test_policy_entries_name_exactly_one_policy() -> None:
    data = {"products": [product(policies=[{}, {"cors": {}, "headers": {}}, "cors", {"cors": {}}])]}
    expected = [
        "products[0].policies[0]: must name exactly one policy, e.g. {cors: {}}",
        "products[0].policies[1]: must name exactly one policy, e.g. {cors: {}}",
        "products[0].policies[2]: must be a mapping",
    ]
    assert errors_of(data) == expected
    assert errors_of(data, policy_schemas=POLICIES) == expected


def test_unknown_policies_pass_without_schemas_and_fail_with_them() -> None:
    data = {"products": [product(policies=[{"cors": {}}, {"corz": {"x": 1}}])]}
    assert parse_config(json.dumps(data)).products[0].policies[1] == {"corz": {"x": 1}}
    assert errors_of(data, policy_schemas=POLICIES) == [
        "products[0].policies[1]: unknown policy 'corz' (known: cors, headers, maintenance)"
    ]
    assert errors_of(data, policy_schemas={}) == [
        "products[0].policies[0]: unknown policy 'cors' (no policy is known)",
        "products[0].policies[1]: unknown policy 'corz' (no policy is known)",
    ]


def test_policy_config_errors_have_paths_inside_the_policy() -> None:
    data = {
        "products": [
            product(
                policies=[
                    {"cors": {"allow_origins": "*", "max_age": -1}},
                    {"headers": {"set": {"X-A": 1}, "add": {}}},
                    {"maintenance": {"status": 200}},
                ]
            )
        ]
    }
    assert errors_of(data, policy_schemas=POLICIES) == [
        "products[0].policies[0].cors.allow_origins: must be a list",
        "products[0].policies[0].cors.max_age: must be at least 0",
        "products[0].policies[1].headers.set.X-A: must be a string (put the value in quotes)",
        "products[0].policies[1].headers.add: unknown field (allowed: set, remove)",
        "products[0].policies[2].maintenance.status: must be at least 400",
    ]


def test_policy_errors_come_with_the_other_errors() -> None:
    data = example()
    data["products"][0]["policies"] = [{"cors": {"allow_origin": ["*"]}}]
    data["products"][0]["plans"][0]["limits"][0]["value"] = -5
    assert errors_of(data, policy_schemas=POLICIES) == [
        "products[0].plans[0].limits[0].value: must be at least 0",
        "products[0].policies[0].cors.allow_origin: "
        "unknown field (allowed: allow_origins, max_age)",
    ]


def test_odd_keys_are_quoted_in_paths() -> None:
    data = {"products": [product(policies=[{"headers": {"set": {"a.b c": 1}}}])]}
    assert errors_of(data, policy_schemas=POLICIES) == [
        'products[0].policies[0].headers.set["a.b c"]: must be a string (put the value in quotes)'
    ]


def test_policy_schemas_accept_any_mapping_and_are_cached() -> None:
    class Only(BaseModel):
        flag: bool = False

    schemas = {"only": Only}
    data = {"products": [product(policies=[{"only": {"flag": "no"}}])]}
    assert errors_of(data, policy_schemas=schemas) == [
        "products[0].policies[0].only.flag: must be true or false"
    ]
    assert errors_of(data, policy_schemas=dict(schemas)) == [
        "products[0].policies[0].only.flag: must be true or false"
    ]


def test_config_error_lists_every_error_under_its_source() -> None:
    one = ConfigError(["listen: is required"], "gw.yaml")
    assert str(one) == "gw.yaml: listen: is required"
    two = ConfigError(["a: is required", "b: must be a list"])
    assert str(two) == "<string>: 2 errors\n  a: is required\n  b: must be a list"
    assert two.errors == ["a: is required", "b: must be a list"]
    with pytest.raises(ConfigError) as info:
        parse_config("listen: 1\nbogus: 2\n", "gw.yaml")
    assert info.value.source == "gw.yaml"
    assert str(info.value).startswith("gw.yaml: 2 errors\n  listen: must be a string")


def test_jwt_keys_a_gateway_could_not_use_are_refused() -> None:
    data = {
        "products": [
            product(name="a", auth={"type": "jwt", "keys": [{"pem": "-----BEGIN nonsense"}]}),
            product(name="b", auth={"type": "jwt", "keys": [{"jwk": {"kty": "RSA", "n": "x"}}]}),
            product(name="c", auth={"type": "jwt", "jwks_url": "file:///etc/passwd"}),
        ]
    }
    errors = errors_of(data)
    assert errors[0] == "products[0].auth.keys[0].pem: not a PEM public key or certificate"
    assert errors[1].startswith("products[1].auth.keys[0].jwk: not a usable JWK:")
    assert errors[2] == "products[2].auth.jwks_url: must be an http:// or https:// URL"
