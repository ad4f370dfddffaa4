"""Mapping rules end to end: what each request counts, read back from /usage/{app}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import TIMEOUT, values
from harness import echo_upstream, example_product, gateway_config, run_gateway

KEY = {"X-API-Key": "k1"}
METRICS = ["hits", "search", "bulk", "full", "query", "orders", "order_lines"]


def test_mapping_rules_count_metrics_parents_and_increments(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            metrics=[
                {"name": "hits"},
                {"name": "search", "parent": "hits"},
                {"name": "bulk", "parent": "hits"},
                {"name": "full"},
                {"name": "query"},
                {"name": "orders", "parent": "hits"},
                {"name": "order_lines", "parent": "orders"},
            ],
            mapping_rules=[
                {"method": "GET", "pattern": "/search", "metric": "search", "last": True},
                {"method": "POST", "pattern": "/bulk$", "metric": "bulk", "increment": 5},
                {"method": "GET", "pattern": "/items?type=full", "metric": "full"},
                {"method": "GET", "pattern": "/items?q={q}", "metric": "query", "increment": 2},
                {"method": "GET", "pattern": "/orders/{id}/lines", "metric": "order_lines"},
                {"method": "ANY", "pattern": "/", "metric": "hits"},
            ],
            plans=[
                {
                    "name": "basic",
                    "limits": [{"metric": m, "period": "eternity", "value": 1000} for m in METRICS],
                }
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def counted(method: str, path: str) -> dict[str, int]:
                """What one request added to each metric."""
                before = values(gw, "app1")
                answer = client.request(method, path, headers=KEY)
                assert answer.status_code == 200, (method, path, answer.text)
                after = values(gw, "app1")
                return {m: after[(m, "eternity")] - before[(m, "eternity")] for m in METRICS
                        if after[(m, "eternity")] != before[(m, "eternity")]}  # fmt: skip

            # last: the catch-all "/" rule after it is not evaluated (hits would be 2).
            assert counted("GET", "/echo/search") == {"search": 1, "hits": 1}
            assert counted("GET", "/echo/search/deeper") == {"search": 1, "hits": 1}
            # POST is not the search rule's method: only the catch-all.
            assert counted("POST", "/echo/search") == {"hits": 1}
            # Not last: a matching rule and the catch-all both count on hits.
            assert counted("POST", "/echo/bulk") == {"bulk": 5, "hits": 6}
            # "$" makes the pattern exact.
            assert counted("POST", "/echo/bulk/more") == {"hits": 1}
            # Query rules need the parameter (and the value, when the rule fixes one).
            assert counted("GET", "/echo/items?type=full") == {"full": 1, "hits": 1}
            assert counted("GET", "/echo/items?type=partial") == {"hits": 1}
            assert counted("GET", "/echo/items?q=shoes&type=full") == {
                "full": 1,
                "query": 2,
                "hits": 1,
            }
            assert counted("GET", "/echo/items") == {"hits": 1}
            # A grandchild counts on its parent and its grandparent.
            assert counted("GET", "/echo/orders/42/lines") == {
                "order_lines": 1,
                "orders": 1,
                "hits": 2,
            }
            # A wildcard is exactly one segment.
            assert counted("GET", "/echo/orders/lines") == {"hits": 1}


def test_a_request_matching_no_rule_counts_nothing(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            mapping_rules=[
                {"method": "GET", "pattern": "/search", "metric": "search"},
                {"method": "GET", "pattern": "/", "metric": "hits", "increment": 0},
            ],
            plans=[
                {
                    "name": "basic",
                    "limits": [
                        {"metric": "hits", "period": "eternity", "value": 10},
                        {"metric": "search", "period": "eternity", "value": 10},
                    ],
                }
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            zero = {("hits", "eternity"): 0, ("search", "eternity"): 0}
            for method in ("POST", "DELETE", "PUT"):
                assert client.request(method, "/echo/search", headers=KEY).status_code == 404
            assert values(gw, "app1") == zero
            # Increment 0 matches (so 200) but counts nothing.
            answer = client.get("/echo/anything", headers=KEY)
            assert answer.status_code == 200
            assert answer.headers["ratelimit"].startswith('"hits-eternity";r=10')
            assert values(gw, "app1") == zero
            assert client.get("/echo/search", headers=KEY).status_code == 200
            assert values(gw, "app1") == {("hits", "eternity"): 1, ("search", "eternity"): 1}


def test_case_insensitive_rules_count_every_spelling_of_a_path(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:

        def product(name: str, **more: Any) -> dict[str, Any]:
            return example_product(
                upstream,
                name=name,
                path_prefix=f"/{name}",
                metrics=[{"name": "hits"}, {"name": "admin", "parent": "hits"}],
                mapping_rules=[
                    {"method": "ANY", "pattern": "/admin", "metric": "admin", "last": True},
                    {"method": "ANY", "pattern": "/", "metric": "hits"},
                ],
                plans=[
                    {
                        "name": "basic",
                        "limits": [
                            {"metric": "admin", "period": "eternity", "value": 0},
                            {"metric": "hits", "period": "eternity", "value": 100},
                        ],
                    }
                ],
                **more,
            )

        products = [product("plain"), product("folded", case_insensitive_rules=True)]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):

            def status(path: str) -> int:
                return client.get(path, headers=KEY).status_code

            # The admin metric is forbidden (limit 0): a request its rule counts gets 429.
            for spelling in ("/admin", "/ADMIN", "/Admin/x", "/%41dmin", "/aDmIn"):
                assert status(f"/folded{spelling}") == 429, spelling
            assert status("/folded/administrator") == 200
            answer = client.get("/folded/ADMINISTRATOR", headers=KEY)
            assert answer.status_code == 200 and answer.json()["path"] == "/ADMINISTRATOR"
            # By default only the spelling of the rule matches it.
            assert status("/plain/admin") == 429
            for spelling in ("/ADMIN", "/Admin/x", "/%41dmin"):
                assert status(f"/plain{spelling}") == 200, spelling
            assert values(gw, "app1", "folded") == {
                ("admin", "eternity"): 0,
                ("hits", "eternity"): 2,
            }
