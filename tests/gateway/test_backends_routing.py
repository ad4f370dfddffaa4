"""Several backends per product (3scale backend usages): the longest backend path under the
product wins and is removed; a path no backend serves is 404. Real gateway, real upstreams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import echo_upstream, example_product, gateway_config, run_gateway

from meshgate.config import Config
from meshgate.gateway import Gateway
from meshgate.limits import create_backend
from meshgate.proxy import H2UpstreamPool, UpstreamPool
from meshgate.telemetry.metrics import GatewayMetrics

KEY = {"X-API-Key": "k1"}
TIMEOUT = 20.0
ETERNAL = [
    {
        "name": "basic",
        "limits": [
            {"metric": "hits", "period": "eternity", "value": 1000},
            {"metric": "search", "period": "eternity", "value": 1000},
        ],
    }
]


def forwarded(client: httpx.Client, path: str, headers: dict[str, str] = KEY) -> tuple[int, str]:
    """The port of the upstream that answered and the path and query it received."""
    response = client.get(path, headers=headers)
    assert response.status_code == 200, (path, response.status_code, response.text)
    doc = response.json()
    host = {k.lower(): v for k, v in doc["headers"].items()}["host"]
    target = doc["path"] + (f"?{doc['query']}" if doc["query"] else "")
    return int(host.rpartition(":")[2]), target


def hits(client: httpx.Client, admin_url: str, product: str) -> int:
    doc = client.get(f"{admin_url}/usage/app1").json()
    (found,) = [p for p in doc["products"] if p["product"] == product]
    return next(u["value"] for u in found["limits"] if u["metric"] == "hits")


def test_the_longest_backend_path_wins_and_is_removed(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as one, echo_upstream(tmp_path) as two:
        backends = [
            {"path": "/", "url": f"http://127.0.0.1:{one}/root"},
            {"path": "/v2", "url": f"http://127.0.0.1:{two}/base"},
            {"path": "/v2/admin", "url": f"http://127.0.0.1:{one}/adm"},
            {"path": "/plain", "url": f"http://127.0.0.1:{two}"},
        ]
        product = example_product(one, path_prefix="/api", plans=ETERNAL, backends=backends)
        del product["backend"]
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert forwarded(client, "/api/v2/x") == (two, "/base/x")
            assert forwarded(client, "/api/v2/x/y?q=1&r=2") == (two, "/base/x/y?q=1&r=2")
            assert forwarded(client, "/api/v2") == (two, "/base/")
            # On a segment boundary only: /v2x is not under /v2.
            assert forwarded(client, "/api/v2x") == (one, "/root/v2x")
            assert forwarded(client, "/api/v2/admin/users") == (one, "/adm/users")
            assert forwarded(client, "/api/v2/administrator") == (two, "/base/administrator")
            assert forwarded(client, "/api/other") == (one, "/root/other")
            assert forwarded(client, "/api") == (one, "/root/")
            assert forwarded(client, "/api/plain/z") == (two, "/z")
            # Mapping rules still see the whole path below the product's prefix.
            before = hits(client, gw.admin_url, "echo")
            assert forwarded(client, "/api/search") == (one, "/root/search")
            assert hits(client, gw.admin_url, "echo") == before + 1
            # An unknown key is still refused on a multi-backend product.
            assert client.get("/api/v2/x", headers={"X-API-Key": "nope"}).status_code == 403


def test_a_path_no_backend_serves_is_404_and_not_counted(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as one:
        backends = [
            {"path": "/v1", "url": f"http://127.0.0.1:{one}/one"},
            {"path": "/v2", "url": f"http://127.0.0.1:{one}/two"},
        ]
        product = example_product(one, path_prefix="/api", plans=ETERNAL, backends=backends)
        del product["backend"]
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert forwarded(client, "/api/v1/a") == (one, "/one/a")
            counted = hits(client, gw.admin_url, "echo")
            for path in ("/api/v3/a", "/api", "/api/", "/api/v10"):
                response = client.get(path, headers=KEY)
                assert response.status_code == 404, path
                assert response.headers["content-type"] == "application/problem+json"
                assert "no backend" in response.json()["detail"]
            assert hits(client, gw.admin_url, "echo") == counted


def test_without_strip_prefix_backend_paths_match_the_whole_path(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as one:
        backends = [
            {"path": "/api/v1", "url": f"http://127.0.0.1:{one}/one"},
            {"path": "/api", "url": f"http://127.0.0.1:{one}"},
        ]
        product = example_product(
            one, path_prefix="/api", strip_prefix=False, plans=ETERNAL, backends=backends
        )
        del product["backend"]
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert forwarded(client, "/api/v1/x?k=v") == (one, "/one/x?k=v")
            assert forwarded(client, "/api/v2/x") == (one, "/v2/x")
            assert forwarded(client, "/api") == (one, "/")


def test_a_rewritten_path_is_routed_to_its_backend(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as one, echo_upstream(tmp_path) as two:
        backends = [
            {"path": "/v1", "url": f"http://127.0.0.1:{one}/old"},
            {"path": "/v2", "url": f"http://127.0.0.1:{two}/new"},
        ]
        rewrite = {"url_rewrite": {"commands": [{"regex": "^/v1/", "replace": "/v2/"}]}}
        product = example_product(
            one, path_prefix="/api", plans=ETERNAL, backends=backends, policies=[rewrite]
        )
        del product["backend"]
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert forwarded(client, "/api/v1/thing") == (two, "/new/thing")


def _gateway(products: list[dict[str, Any]]) -> Gateway:
    config = Config.model_validate({"products": products})
    return Gateway(config, create_backend("memory", "", 1.0, "t"), GatewayMetrics())


def test_backends_on_one_address_share_a_pool() -> None:
    async def build() -> Gateway:
        auth = {"type": "none", "default_application": "a"}
        apps = [{"id": "a", "plan": "p"}]
        common: dict[str, Any] = {"auth": auth, "plans": [{"name": "p"}], "applications": apps}
        return _gateway(
            [
                {
                    "name": "multi",
                    "path_prefix": "/m",
                    "backends": [
                        {"path": "/a", "url": "http://127.0.0.1:9100/x"},
                        {"path": "/b", "url": "http://127.0.0.1:9100/y"},
                        {"path": "/c", "url": "http://127.0.0.1:9101"},
                    ],
                    **common,
                },
                {"name": "single", "backend": "http://127.0.0.1:9100/z", **common},
            ]
        )

    gateway = asyncio.run(build())
    assert sorted((host, port) for host, port, *_ in gateway.pools) == [
        ("127.0.0.1", 9100),
        ("127.0.0.1", 9101),
    ]
    multi, single = gateway.products
    assert multi.backends is not None and len({id(b.pool) for b in multi.backends}) == 2
    # One backend at / takes the single-backend path: no per-request backend routing.
    assert single.backends is None and single.pool is multi.backends[0].pool


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a", ("/a", "/")), ("/a/b", ("/a", "/b")), ("/ab", None), ("/c/a/b", ("/c/a", "/b"))],
)
def test_route_matches_on_segment_boundaries(path: str, expected: tuple[str, str] | None) -> None:
    async def build() -> Gateway:
        return _gateway(
            [
                {
                    "name": "p",
                    "backends": [
                        {"path": "/a", "url": "http://127.0.0.1:9100"},
                        {"path": "/c/a", "url": "http://127.0.0.1:9100"},
                    ],
                    "auth": {"type": "none", "default_application": "a"},
                    "plans": [{"name": "p"}],
                    "applications": [{"id": "a", "plan": "p"}],
                }
            ]
        )

    (product,) = asyncio.run(build()).products
    routed = product.route(path)
    assert (None if routed is None else (routed[0].path, routed[1])) == expected


def test_the_protocol_chooses_the_pool_per_backend() -> None:
    async def build() -> Gateway:
        auth = {"type": "none", "default_application": "a"}
        apps = [{"id": "a", "plan": "p"}]
        common: dict[str, Any] = {"auth": auth, "plans": [{"name": "p"}], "applications": apps}
        return _gateway(
            [
                {
                    "name": "grpc",
                    "path_prefix": "/g",
                    "protocol": "h2c",
                    "backends": [
                        {"path": "/a", "url": "http://127.0.0.1:9100"},
                        {"path": "/b", "url": "http://127.0.0.1:9101", "protocol": "http1"},
                    ],
                    **common,
                },
                {"name": "plain", "backend": "http://127.0.0.1:9100", **common},
            ]
        )

    gateway = asyncio.run(build())
    grpc, plain = gateway.products
    assert grpc.backends is not None
    by_path = {b.path: b.pool for b in grpc.backends}
    assert isinstance(by_path["/a"], H2UpstreamPool) and by_path["/a"].tls is None
    assert isinstance(by_path["/b"], UpstreamPool)
    # The same address spoken to in HTTP/1.1 by another product is another pool.
    assert isinstance(plain.pool, UpstreamPool) and plain.pool is not by_path["/a"]
    assert sorted(key[5] for key in gateway.pools) == ["h2c", "http1", "http1"]
