"""Every status the gateway decides itself, routing, and the path the upstream receives."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import ETERNAL_PLANS, TIMEOUT, reset_bracket, stay_inside_minute, values
from harness import echo_upstream, example_product, gateway_config, run_gateway

KEY = {"X-API-Key": "k1"}


def open_product(name: str, backend: str, **overrides: Any) -> dict[str, Any]:
    """A product without credentials, so that only routing decides the answer."""
    product: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "auth": {"type": "none", "default_application": f"{name}-app"},
        "plans": [{"name": "free"}],
        "applications": [{"id": f"{name}-app", "plan": "free"}],
    }
    product.update(overrides)
    return product


def test_credentials_decide_401_and_403(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            plans=ETERNAL_PLANS,
            applications=[
                {"id": "app1", "plan": "basic", "keys": ["k1"]},
                {"id": "app2", "plan": "basic", "keys": ["k2"], "state": "suspended"},
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            missing = client.get("/echo/hello")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == 'Key realm="echo"'
            assert missing.headers["content-type"] == "application/problem+json"
            assert "X-API-Key" in missing.json()["detail"]
            empty = client.get("/echo/hello", headers={"X-API-Key": ""})
            assert empty.status_code == 401 and "www-authenticate" in empty.headers

            unknown = client.get("/echo/hello", headers={"X-API-Key": "nope"})
            assert unknown.status_code == 403
            assert unknown.json()["title"] == "credential invalid"

            suspended = client.get("/echo/hello", headers={"X-API-Key": "k2"})
            assert suspended.status_code == 403
            assert "suspended" in suspended.json()["detail"]

            assert client.get("/echo/hello", headers=KEY).status_code == 200
            # Refused requests count nothing, for the suspended application either.
            assert values(gw, "app2")[("hits", "eternity")] == 0
            assert values(gw, "app1")[("hits", "eternity")] == 1


def test_routing_by_host_and_longest_prefix(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        base = f"http://127.0.0.1:{upstream}"
        products = [
            # Listed least specific first: the order in the file must not decide.
            open_product("any", f"{base}/any", hosts=["*"], path_prefix="/r"),
            open_product("wild", f"{base}/wild", hosts=["*.example.com"], path_prefix="/r"),
            open_product("deep", f"{base}/deep", hosts=["*.deep.example.com"], path_prefix="/r"),
            open_product("exact", f"{base}/exact", hosts=["api.example.com"], path_prefix="/r"),
            open_product("short", f"{base}/short", path_prefix="/echo"),
            open_product("long", f"{base}/long", path_prefix="/echo/v2"),
        ]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def upstream_path(path: str, host: str | None = None) -> str | int:
                headers = {"Host": host} if host is not None else {}
                response = client.get(path, headers=headers)
                if response.status_code != 200:
                    return response.status_code
                return str(response.json()["path"])

            assert upstream_path("/r/x", "api.example.com") == "/exact/x"
            assert upstream_path("/r/x", "API.Example.COM:8080") == "/exact/x"
            assert upstream_path("/r/x", "a.example.com") == "/wild/x"
            assert upstream_path("/r/x", "a.b.example.com") == "/wild/x"
            assert upstream_path("/r/x", "x.deep.example.com") == "/deep/x"
            # *.example.com is a suffix on a label boundary: not example.com, not badexample.com.
            assert upstream_path("/r/x", "example.com") == "/any/x"
            assert upstream_path("/r/x", "badexample.com") == "/any/x"
            assert upstream_path("/r/x", "other.org") == "/any/x"
            # A host's products without a matching prefix fall through to the wildcard hosts.
            assert upstream_path("/echo/a", "api.example.com") == "/short/a"

            assert upstream_path("/echo/hello") == "/short/hello"
            assert upstream_path("/echo/v2/items") == "/long/items"
            assert upstream_path("/echo/v2/") == "/long/"
            assert upstream_path("/echo/v2x") == "/short/v2x"
            assert upstream_path("/echo") == "/short/"

            for path in ("/echoes", "/ec", "/", "/rx"):
                answer = client.get(path)
                assert answer.status_code == 404, path
                assert answer.headers["content-type"] == "application/problem+json"
                assert "no API product" in answer.json()["detail"]


def test_no_mapping_rule_is_404_and_counts_nothing(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            mapping_rules=[{"method": "GET", "pattern": "/things", "metric": "hits"}],
            plans=[
                {"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 9}]}
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert client.post("/echo/things", headers=KEY).status_code == 404
            other = client.get("/echo/other", headers=KEY)
            assert other.status_code == 404
            assert "no mapping rule" in other.json()["detail"]
            assert "ratelimit" not in other.headers
            assert values(gw, "app1") == {("hits", "eternity"): 0}
            assert client.get("/echo/things/1", headers=KEY).status_code == 200
            assert values(gw, "app1") == {("hits", "eternity"): 1}


def test_over_the_limit_is_429_with_ratelimit_fields(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            stay_inside_minute()
            for remaining in (4, 3, 2, 1, 0):
                before = time.time()
                ok = client.get("/echo/hello", headers=KEY)
                after = time.time()
                assert ok.status_code == 200
                assert ok.headers["ratelimit-policy"] == '"hits-minute";q=5;w=60'
                name, r, t = ok.headers["ratelimit"].split(";")
                assert (name, r) == ('"hits-minute"', f"r={remaining}")
                assert int(t.removeprefix("t=")) in reset_bracket("minute", before, after)

            before = time.time()
            refused = client.get("/echo/hello", headers=KEY)
            after = time.time()
            assert refused.status_code == 429
            assert refused.headers["ratelimit-policy"] == '"hits-minute";q=5;w=60'
            name, r, t = refused.headers["ratelimit"].split(";")
            assert (name, r) == ('"hits-minute"', "r=0")
            reset = int(t.removeprefix("t="))
            assert reset in reset_bracket("minute", before, after)
            assert int(refused.headers["retry-after"]) == max(1, reset)
            body = refused.json()
            assert refused.headers["content-type"] == "application/problem+json"
            assert (body["metric"], body["period"], body["limit"]) == ("hits", "minute", 5)
            # The refused request was not counted.
            assert values(gw, "app1")[("hits", "minute")] == 5


def test_success_carries_the_most_constrained_limit(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        limits = [
            {"metric": "hits", "period": "minute", "value": 5},
            {"metric": "hits", "period": "hour", "value": 3},
            {"metric": "hits", "period": "day", "value": 100},
            {"metric": "search", "period": "day", "value": 1000},
        ]
        tied = [
            {"metric": "hits", "period": "minute", "value": 2},
            {"metric": "hits", "period": "day", "value": 2},
        ]
        products = [
            example_product(upstream, plans=[{"name": "basic", "limits": limits}]),
            example_product(
                upstream,
                name="tied",
                path_prefix="/tied",
                plans=[{"name": "basic", "limits": tied}],
            ),
        ]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            stay_inside_minute()
            first = client.get("/echo/search", headers=KEY)
            assert first.status_code == 200
            assert first.headers["ratelimit-policy"] == '"hits-hour";q=3;w=3600'
            assert first.headers["ratelimit"].startswith('"hits-hour";r=2;t=')
            assert len(first.headers.get_list("ratelimit")) == 1
            # Equal remaining: the window that resets later constrains more.
            tie = client.get("/tied/x", headers=KEY)
            assert tie.headers["ratelimit-policy"] == '"hits-day";q=2;w=86400'
            assert tie.headers["ratelimit"].startswith('"hits-day";r=1;t=')


def test_maintenance_answers_503_without_a_key_and_counts_nothing(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            policies=[{"maintenance": {"message": "back at noon", "retry_after": 120}}],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            for headers in ({}, KEY):
                answer = client.get("/echo/hello", headers=headers)
                assert answer.status_code == 503
                assert answer.headers["retry-after"] == "120"
                assert answer.json()["detail"] == "back at noon"
                assert answer.headers["content-type"] == "application/problem+json"
            assert values(gw, "app1")[("hits", "minute")] == 0


def test_strip_prefix_and_backend_base_path(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        plain = f"http://127.0.0.1:{upstream}"
        based = f"{plain}/base"
        eternal = [{"name": "basic", "limits": [
            {"metric": "hits", "period": "eternity", "value": 100},
            {"metric": "search", "period": "eternity", "value": 100},
        ]}]  # fmt: skip
        products = [
            example_product(upstream, name="s", path_prefix="/s", plans=eternal),
            example_product(
                upstream, name="n", path_prefix="/n", strip_prefix=False, plans=eternal
            ),
            example_product(upstream, name="sb", path_prefix="/sb", backend=based, plans=eternal),
            example_product(
                upstream,
                name="nb",
                path_prefix="/nb",
                strip_prefix=False,
                backend=based,
                plans=eternal,
            ),
            example_product(upstream, name="root", path_prefix="/", backend=based, plans=eternal),
        ]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def upstream_path(path: str) -> tuple[str, str]:
                response = client.get(path, headers=KEY)
                assert response.status_code == 200, (path, response.text)
                doc = response.json()
                return doc["path"], doc["query"]

            assert upstream_path("/s/hello") == ("/hello", "")
            assert upstream_path("/s/a/b?x=1&y=2") == ("/a/b", "x=1&y=2")
            assert upstream_path("/s") == ("/", "")
            assert upstream_path("/n/hello") == ("/n/hello", "")
            assert upstream_path("/n/a/b?x=1") == ("/n/a/b", "x=1")
            assert upstream_path("/n") == ("/n", "")
            assert upstream_path("/n/") == ("/n/", "")
            assert upstream_path("/sb/hello") == ("/base/hello", "")
            assert upstream_path("/nb/hello?q=1") == ("/base/nb/hello", "q=1")
            assert upstream_path("/other") == ("/base/other", "")

            # Mapping rules see the path below the prefix whether or not it is stripped.
            for name in ("s", "n", "sb", "nb"):
                before = values(gw, "app1", name)
                upstream_path(f"/{name}/search")
                after = values(gw, "app1", name)
                assert after[("search", "eternity")] == before[("search", "eternity")] + 1, name
                assert after[("hits", "eternity")] == before[("hits", "eternity")] + 1, name
