"""What configuration can put on the wire (URLs, hosts, header names and values) holds no
control characters, so that no setting can end a request head early and add fields of its
own: the model, the JSON Schema and every known policy refuse alike."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from config_cases import errors_of

from meshgate.config import json_schema, parse_config
from meshgate.policies import schemas

INJECTED = "http://127.0.0.1:9101/a HTTP/1.1\r\nX-Injected: 1\r\nX-Pad: "
CRLF = "x\r\nX-Injected: 1"


def product(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "p",
        "backend": "http://127.0.0.1:9001",
        "auth": {"type": "api_key"},
    }
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


URL_PROBLEM = (
    "must not contain spaces, control characters or non-ASCII characters (percent-encode them)"
)
HEADER_PROBLEM = (
    "must be a header name: letters, digits and !#$%&'*+-.^_`|~ (no spaces or control characters)"
)

REFUSED = {
    "backend": (
        {"products": [product(backend=INJECTED)]},
        f"products[0].backend: {URL_PROBLEM}",
    ),
    "backend with a space": (
        {"products": [product(backend="http://127.0.0.1:9101/a b")]},
        f"products[0].backend: {URL_PROBLEM}",
    ),
    "backend host": (
        {"products": [product(backend="http://a\r\nX-Injected:1/")]},
        f"products[0].backend: {URL_PROBLEM}",
    ),
    "backends url": (
        {
            "products": [
                product(backend=None, backends=[{"path": "/", "url": INJECTED}]),
            ]
        },
        f"products[0].backends[0].url: {URL_PROBLEM}",
    ),
    "path prefix": (
        {"products": [product(path_prefix=f"/echo{CRLF}", strip_prefix=False)]},
        f"products[0].path_prefix: {URL_PROBLEM}",
    ),
    "backend path": (
        {
            "products": [
                product(backend=None, backends=[{"path": "/v2 x", "url": "http://h:1"}]),
            ]
        },
        f"products[0].backends[0].path: {URL_PROBLEM}",
    ),
    "host": (
        {"products": [product(hosts=[f"api.example.com{CRLF}"])]},
        "products[0].hosts[0]: must be a host name without spaces or control characters",
    ),
    "host with a space": (
        {"products": [product(hosts=["api example.com"])]},
        "products[0].hosts[0]: must be a host name without spaces or control characters",
    ),
    "api key header": (
        {"products": [product(auth={"type": "api_key", "header": f"X-Key{CRLF}"})]},
        f"products[0].auth.header: {HEADER_PROBLEM}",
    ),
    "api key header with a colon": (
        {"products": [product(auth={"type": "api_key", "header": "X-Key: 1"})]},
        f"products[0].auth.header: {HEADER_PROBLEM}",
    ),
    "api key query": (
        {"products": [product(auth={"type": "api_key", "query": "key\r\n"})]},
        "products[0].auth.query: must be a query parameter name without control characters",
    ),
    "app id header": (
        {"products": [product(auth={"type": "app_id_key", "app_id_header": f"X-Id{CRLF}"})]},
        f"products[0].auth.app_id_header: {HEADER_PROBLEM}",
    ),
    "app key header": (
        {"products": [product(auth={"type": "app_id_key", "app_key_header": "X Key"})]},
        f"products[0].auth.app_key_header: {HEADER_PROBLEM}",
    ),
    "app key query": (
        {"products": [product(auth={"type": "app_id_key", "app_key_query": "k\x00"})]},
        "products[0].auth.app_key_query: must be a query parameter name without control characters",
    ),
    "jwt header": (
        {
            "products": [
                product(auth={"type": "jwt", "jwks_url": "http://idp/jwks", "header": CRLF})
            ]
        },
        f"products[0].auth.header: {HEADER_PROBLEM}",
    ),
    "jwks url": (
        {"products": [product(auth={"type": "jwt", "jwks_url": f"http://idp/{CRLF}"})]},
        f"products[0].auth.jwks_url: {URL_PROBLEM}",
    ),
    "redis url": (
        {"limits": {"backend": "redis", "redis_url": f"redis://127.0.0.1:6379/0{CRLF}"}},
        f"limits.redis_url: {URL_PROBLEM}",
    ),
}

POLICY_REFUSED = {
    "url_rewrite replacement": (
        {"url_rewrite": {"commands": [{"regex": "^/a", "replace": f"/a HTTP/1.1{CRLF}"}]}},
        "invalid replacement",
    ),
    "url_rewrite replacement with a space": (
        {"url_rewrite": {"commands": [{"regex": "^/(a)", "replace": r"/\1 b"}]}},
        "invalid replacement",
    ),
    "url_rewrite replacement with an escaped LF": (
        {"url_rewrite": {"commands": [{"regex": "^/(?P<n>a)", "replace": r"/\g<n>\r\nX-A:1"}]}},
        "invalid replacement",
    ),
    "url_rewrite replacement with an octal CR": (
        {"url_rewrite": {"commands": [{"regex": "^/a", "replace": r"/b\015"}]}},
        "invalid replacement",
    ),
    "headers name": (
        {"headers": {"request": {"set": {f"X-A{CRLF}": "1"}}}},
        "is not a valid header name",
    ),
    "headers value": (
        {"headers": {"request": {"add": {"X-A": f"1{CRLF}"}}}},
        "must be Latin-1 text without control characters",
    ),
    "cors header name": (
        {"cors": {"expose_headers": [f"X-A{CRLF}"]}},
        "is not a valid header name",
    ),
    "cors method": (
        {"cors": {"allow_methods": ["GET\r\n"]}},
        "is not a valid header name",
    ),
    "cors origin": (
        {"cors": {"allow_origins": [f"https://a.example{CRLF}"]}},
        "is not an origin",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_the_model_refuses_control_characters_naming_the_field(case: str) -> None:
    data, error = REFUSED[case]
    assert errors_of(data) == [error]


@pytest.mark.parametrize("case", REFUSED)
def test_the_shipped_schema_refuses_them_too(case: str) -> None:
    data, _ = REFUSED[case]
    validator = jsonschema.Draft202012Validator(json_schema(schemas()))
    assert not validator.is_valid(data)


def test_a_trailing_line_feed_is_refused_too() -> None:
    # Python's $ also matches before a final LF; the model matches whole strings. (ECMA-262,
    # which JSON Schema patterns follow, does not: jsonschema's re.search would let it by.)
    data = {"products": [product(backend="http://127.0.0.1:9101/a\n", hosts=["a.example\n"])]}
    assert errors_of(data) == [
        "products[0].hosts[0]: must be a host name without spaces or control characters",
        f"products[0].backend: {URL_PROBLEM}",
    ]


@pytest.mark.parametrize("case", POLICY_REFUSED)
def test_every_policy_refuses_them(case: str) -> None:
    policy, error = POLICY_REFUSED[case]
    data = {"products": [product(policies=[policy])]}
    (line,) = errors_of(data, policy_schemas=schemas())
    assert line.startswith("products[0].policies[0]"), line
    assert error in line, line


def test_the_values_a_gateway_needs_are_still_accepted() -> None:
    data = {
        "limits": {"backend": "redis", "redis_url": "redis://:p%40ss@127.0.0.1:6379/0"},
        "products": [
            product(
                hosts=["*", "*.example.com", "[::1]", "é.example.com"],
                backend="http://[::1]:9001/base/v1;x=1/~user/a%20b",
                auth={"type": "app_id_key", "app_id_header": "X-App_Id.1", "app_id_query": "id"},
                policies=[
                    {"url_rewrite": {"commands": [{"regex": "^/(a) (b)", "replace": r"/\1%20\2"}]}},
                    {"headers": {"request": {"set": {"X-Tab": "a\tb c"}}}},
                ],
            ),
            product(
                name="q",
                path_prefix="/q",
                auth={"type": "api_key", "query": "api key", "header": "X-Key"},
                backend="http://upstream.internal:80",
            ),
        ],
    }
    config = parse_config(json.dumps(data), policy_schemas=schemas())
    assert config.products[0].backend == "http://[::1]:9001/base/v1;x=1/~user/a%20b"
    jsonschema.Draft202012Validator(json_schema(schemas())).validate(data)
