"""The example configuration, end to end, as the README's walkthrough shows it."""

from __future__ import annotations

import httpx
from harness import echo_upstream, example_product, gateway_config, run_gateway


def test_example_config_counts_and_limits(tmp_path):
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([example_product(upstream)])
        with run_gateway(config, tmp_path) as gw, httpx.Client(base_url=gw.url) as client:
            codes = [
                client.get("/echo/hello", headers={"X-API-Key": "k1"}).status_code for _ in range(6)
            ]
            assert codes == [200] * 5 + [429]
            assert client.get("/echo/hello").status_code == 401
            assert client.get("/echo/hello", headers={"X-API-Key": "nope"}).status_code == 403
            assert client.get("/nowhere", headers={"X-API-Key": "k1"}).status_code == 404
            usage = httpx.get(f"{gw.admin_url}/usage/app1").json()
            hits = usage["products"][0]["limits"][0]
            assert (hits["metric"], hits["value"], hits["remaining"]) == ("hits", 5, 0)
