"""Path attacks end to end: every request target is either refused with a clean 400 or
routed, matched and forwarded as one normalized path."""

from __future__ import annotations

import httpx
import pytest
from proxy_helpers import get, request

# (request target, path the /rec upstream receives): /rec strips its prefix.
NORMALIZED = [
    ("/rec/a/../norm-dotdot", "/norm-dotdot"),
    ("/rec/%2e%2e/rec/norm-encoded-dotdot", "/norm-encoded-dotdot"),
    ("/rec/x/%2E%2e/norm-mixed-case", "/norm-mixed-case"),
    ("/rec/x/.%2E/norm-half-encoded", "/norm-half-encoded"),
    ("/rec/./norm-single-dot", "/norm-single-dot"),
    ("/rec//norm-double//slash///x", "/norm-double/slash/x"),
    ("/rec/%6eorm-unreserved%7E", "/norm-unreserved~"),
    ("/rec/norm-reserved%20kept%3F%25", "/norm-reserved%20kept%3F%25"),
    ("/rec/norm-lowercase-hex%3f", "/norm-lowercase-hex%3F"),
    ("/rec/norm-query?q=/../x&r=%2e%2e", "/norm-query?q=/../x&r=%2e%2e"),
    ("/rec/norm-trailing/", "/norm-trailing/"),
    ("http://other.example/rec/norm-absolute-form", "/norm-absolute-form"),
]


@pytest.mark.parametrize(("target", "upstream_target"), NORMALIZED)
def test_path_is_normalized_before_routing_and_forwarding(proxy_env, target, upstream_target):
    reply = request(proxy_env.port, get(target))
    assert reply.status == 200, reply.body
    assert reply.json()["target"] == upstream_target
    marker = upstream_target.split("?")[0]
    seen = proxy_env.recorder.requests_for(marker)
    assert [r.target for r in seen] == [upstream_target]


REFUSED = [
    "/rec/refused-%2fencoded-slash",
    "/rec/refused-%2Fencoded-slash-upper",
    "/rec/refused-%5cencoded-backslash",
    "/rec/refused-\\backslash",
    "/rec/refused-%00nul",
    "/rec/refused-%zzbad-escape",
    "/rec/refused-%2",
    "/rec/../../refused-climb",
    "/rec/%2e%2e/%2e%2e/refused-climb-encoded",
    "/rec/refused-\u00e9-raw-latin1",
    "/rec/refused-#fragment",
    "/rec/refused-path-parameter;x",
    "/rec/refused-path-parameter;",
    "/rec/..;/refused-dot-dot-parameter",
    "/rec/x/..;/refused-dot-dot-parameter",
    "/rec/refused-encoded-parameter%3Bx",
    "/rec/refused-encoded-parameter%3b",
    "refused-relative",
    "*",
]


@pytest.mark.parametrize("target", REFUSED)
def test_unsafe_targets_are_a_clean_400_and_not_forwarded(proxy_env, target):
    reply = request(proxy_env.port, get(target))
    assert reply.status == 400, reply.body
    assert reply.get("content-type") == "application/problem+json"
    assert proxy_env.recorder.requests_for("refused-") == []
    proxy_env.assert_serving()


def test_leaving_the_product_prefix_routes_by_the_normalized_path(proxy_env):
    # /rec/../dead/x is /dead/x: the dead product answers (502), not /rec's upstream.
    reply = request(proxy_env.port, get("/rec/../dead/leave-prefix"))
    assert reply.status == 502
    reply = request(proxy_env.port, get("/rec/%2e%2e/admin/leave-prefix"))
    assert reply.status == 404
    assert proxy_env.recorder.requests_for("leave-prefix") == []


def _search_count(proxy_env) -> int:
    usage = httpx.get(f"{proxy_env.gateway.admin_url}/usage/app1").json()
    (product,) = [p for p in usage["products"] if p["product"] == "api"]
    (search,) = [u for u in product["limits"] if u["metric"] == "search"]
    return int(search["value"])


@pytest.mark.parametrize("target", ["/api/%73earch", "/api/x/../search", "/api//search"])
def test_mapping_rules_see_the_normalized_path(proxy_env, target):
    before = _search_count(proxy_env)
    reply = request(proxy_env.port, get(target, "X-API-Key: k1"))
    assert reply.status == 200
    assert reply.json()["target"] == "/search"
    assert _search_count(proxy_env) == before + 1


@pytest.mark.parametrize("target", ["/api/search;x=1", "/api/..;/search", "/api/x/..;/search"])
def test_a_path_parameter_cannot_dodge_a_mapping_rule(proxy_env, target):
    before = _search_count(proxy_env)
    reply = request(proxy_env.port, get(target, "X-API-Key: k1"))
    assert reply.status == 400, reply.body
    assert "path parameter" in reply.json()["detail"]
    assert proxy_env.recorder.requests_for(";") == []
    assert _search_count(proxy_env) == before
