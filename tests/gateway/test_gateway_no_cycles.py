"""A gateway and its configuration are freed by reference counting alone.

Gateways attached to a control plane freeze each snapshot they build out of the cyclic
collector's reach (see ``collector_paused``); that is only safe while a replaced gateway
leaves no reference cycle behind."""

from __future__ import annotations

import asyncio
import gc
import json

from harness import example_product, gateway_config

from meshgate.config import hash_key, parse_snapshot
from meshgate.gateway._gateway import Gateway
from meshgate.limits import MemoryCounters
from meshgate.policies import schemas
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.metrics import GatewayMetrics

SALT = "00112233445566778899aabbccddeeff"


def snapshot() -> str:
    every_policy = [
        {"cors": {"allow_origins": ["*"]}},
        {"headers": {"request": {"set": {"x-a": "1"}}, "response": {"remove": ["server"]}}},
        {"url_rewrite": {"commands": [{"regex": "^/old", "replace": "/new"}]}},
        {"ip_filter": {"deny": ["10.0.0.0/8"]}},
        {"request_size_limit": {"max_bytes": 1024}},
    ]
    keyed = example_product(9, name="keyed", policies=every_policy, key_salt=SALT)
    keyed["applications"] = [
        {"id": f"app{i}", "plan": "basic", "key_hashes": [hash_key(SALT, f"key-{i}")]}
        for i in range(50)
    ]
    pair = example_product(9, name="pair", path_prefix="/pair")
    pair["auth"] = {"type": "app_id_key"}
    jwt = example_product(9, name="jwt", path_prefix="/jwt")
    jwt["auth"] = {
        "type": "jwt",
        "keys": [{"secret": "s" * 32, "algorithm": "HS256"}],
        "algorithms": ["HS256"],
    }
    two = example_product(9, name="two", path_prefix="/two")
    del two["backend"]
    two["backends"] = [
        {"path": "/", "url": "http://127.0.0.1:9"},
        {"path": "/v2", "url": "http://127.0.0.1:10/base"},
    ]
    return json.dumps(
        {"version": "1", "products": gateway_config([keyed, pair, jwt, two])["products"]}
    )


def test_a_replaced_gateway_leaves_no_reference_cycle() -> None:
    text = snapshot()
    loop = asyncio.new_event_loop()  # the upstream pools' loop
    asyncio.set_event_loop(loop)
    # Built once and cached (pydantic's schema building leaves inspect's garbage behind):
    # not what this test is about.
    parse_snapshot(text, policy_schemas=schemas())
    gc.collect()
    gc.disable()
    try:
        config = parse_snapshot(text, policy_schemas=schemas())
        gateway = Gateway(config, MemoryCounters(), GatewayMetrics(), {}, AccessLog())
        assert len(gateway.config.products) == 4
        del gateway, config
        assert gc.collect() == 0
    finally:
        gc.enable()
        asyncio.set_event_loop(None)
        loop.close()
