"""Policies end to end: cors, headers, url_rewrite, ip_filter, request_size_limit."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
from gateway_e2e_support import ETERNAL_PLANS, TIMEOUT, values, wait_for
from harness import echo_upstream, example_product, gateway_config, raw_exchange, run_gateway

KEY = {"X-API-Key": "k1"}
ORIGIN = "https://app.example.com"


def test_cors_preflight_without_a_key_and_cors_on_local_errors(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            policies=[{"cors": {"allow_origins": [ORIGIN], "max_age": 600}}],
            plans=[
                {"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 1}]}
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            preflight = client.options(
                "/echo/hello",
                headers={
                    "Origin": ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "X-API-Key, Content-Type",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == ORIGIN
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert preflight.headers["access-control-allow-headers"] == "X-API-Key, Content-Type"
            assert preflight.headers["access-control-max-age"] == "600"
            assert "ratelimit" not in preflight.headers
            stranger = client.options(
                "/echo/hello",
                headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"},
            )
            assert stranger.status_code == 403
            assert "access-control-allow-origin" not in stranger.headers
            assert values(gw, "app1") == {("hits", "eternity"): 0}

            cors = {"Origin": ORIGIN}
            unauthorized = client.get("/echo/hello", headers=cors)
            assert unauthorized.status_code == 401
            assert unauthorized.headers["access-control-allow-origin"] == ORIGIN
            ok = client.get("/echo/hello", headers={**cors, **KEY})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == ORIGIN
            assert "Origin" in ok.headers["vary"]
            limited = client.get("/echo/hello", headers={**cors, **KEY})
            assert limited.status_code == 429
            assert limited.headers["access-control-allow-origin"] == ORIGIN
            other = client.get("/echo/hello", headers={"Origin": "https://evil.test", **KEY})
            assert "access-control-allow-origin" not in other.headers


def test_headers_policy_edits_both_directions(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            policies=[
                {
                    "headers": {
                        "request": {
                            "remove": ["X-Drop"],
                            "set": {"X-Tenant": "acme", "X-Client": "{client_ip}"},
                            "add": {"X-Added": "one"},
                        },
                        "response": {
                            "remove": ["Content-Type"],
                            "set": {"X-Served-By": "meshgate", "X-Req": "{request_id}"},
                            "add": {"X-Extra": ["a", "b"]},
                        },
                    }
                }
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            answer = client.get(
                "/echo/hello", headers={**KEY, "X-Drop": "secret", "X-Tenant": "spoofed"}
            )
            assert answer.status_code == 200
            seen = answer.json()["headers"]
            assert "x-drop" not in seen
            assert seen["x-tenant"] == "acme"
            assert seen["x-client"] == "127.0.0.1"
            assert seen["x-added"] == "one"
            assert "content-type" not in answer.headers
            assert answer.headers["x-served-by"] == "meshgate"
            assert answer.headers["x-req"] == answer.headers["x-request-id"]
            assert answer.headers.get_list("x-extra") == ["a", "b"]
            # Response edits apply to the gateway's own answers too.
            refused = client.get("/echo/hello")
            assert refused.status_code == 401
            assert refused.headers["x-served-by"] == "meshgate"
            assert "content-type" not in refused.headers


def test_url_rewrite_changes_the_mapping_rule_and_the_upstream_path(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            metrics=[{"name": "hits"}, {"name": "legacy"}, {"name": "fresh"}],
            mapping_rules=[
                {"method": "GET", "pattern": "/v1", "metric": "legacy"},
                {"method": "GET", "pattern": "/v2", "metric": "fresh"},
            ],
            plans=[
                {
                    "name": "basic",
                    "limits": [
                        {"metric": "legacy", "period": "eternity", "value": 0},
                        {"metric": "fresh", "period": "eternity", "value": 10},
                    ],
                }
            ],
            policies=[{"url_rewrite": {"commands": [{"regex": "^/v1/", "replace": "/v2/"}]}}],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            answer = client.get("/echo/v1/items?x=1", headers=KEY)
            # Without the rewrite the v1 rule (limit 0) would refuse it.
            assert answer.status_code == 200, answer.text
            assert (answer.json()["path"], answer.json()["query"]) == ("/v2/items", "x=1")
            assert values(gw, "app1") == {("legacy", "eternity"): 0, ("fresh", "eternity"): 1}


def test_ip_filter_denies_before_authentication(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        products = [
            example_product(
                upstream,
                name="denied",
                path_prefix="/d",
                policies=[{"ip_filter": {"deny": ["127.0.0.0/8"]}}],
            ),
            example_product(
                upstream,
                name="allowed",
                path_prefix="/a",
                policies=[{"ip_filter": {"allow": ["127.0.0.1"]}}],
            ),
            example_product(
                upstream,
                name="elsewhere",
                path_prefix="/e",
                policies=[{"ip_filter": {"allow": ["10.0.0.0/8"]}}],
            ),
        ]
        with (
            run_gateway(gateway_config(products), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            for path in ("/d/x", "/e/x"):
                for headers in ({}, KEY):
                    answer = client.get(path, headers=headers)
                    assert answer.status_code == 403, path
                    assert answer.json()["detail"] == "the client address is not allowed"
            assert client.get("/a/x", headers=KEY).status_code == 200
            assert client.get("/a/x").status_code == 401
            assert values(gw, "app1", "denied")[("hits", "minute")] == 0


def test_request_size_limit_413(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream, plans=ETERNAL_PLANS, policies=[{"request_size_limit": {"max_bytes": 1000}}]
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            fits = client.post("/echo/upload", headers=KEY, content=b"x" * 1000)
            assert fits.status_code == 200 and fits.json()["length"] == 1000
            for headers in ({}, KEY):
                big = client.post("/echo/upload", headers=headers, content=b"x" * 1001)
                assert big.status_code == 413
                assert big.json()["max_bytes"] == 1000
            # A chunked body has no declared length: it is stopped once it crosses the limit,
            # also when its bytes arrived in the same packet as the head.
            chunk = b"x" * 800
            raw = (
                b"POST /echo/upload HTTP/1.1\r\nHost: t\r\nX-API-Key: k1\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
                + b"0\r\n\r\n"
            )
            answer = raw_exchange(gw.port, raw, timeout=TIMEOUT)
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            # The same with the limit crossed in a later packet.
            with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as sock:
                sock.sendall(
                    raw[: raw.index(b"\r\n\r\n") + 4] + b"%x\r\n%s\r\n" % (len(chunk), chunk)
                )
                # The head was authorized and counted before the body crossed the limit.
                wait_for(lambda: values(gw, "app1")[("hits", "eternity")] == 2, what="count")
                sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
                later = sock.recv(65536)
            assert later.startswith(b"HTTP/1.1 413"), later[:200]
            assert values(gw, "app1")[("hits", "eternity")] == 2
