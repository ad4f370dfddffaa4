"""A control plane's snapshot, written a product a line, is decoded and built product by
product (handing the GIL and the event loop over between products) into the same ``Config``
and the same refusals as the whole document; any other layout is decoded as a whole."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from harness import example_product, gateway_config
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from meshgate.config import Config, ConfigError, hash_key, validate_snapshot
from meshgate.config.loader import validate_snapshot_product
from meshgate.control import snapshots
from meshgate.control.models import Base
from meshgate.gateway import _controlplane
from meshgate.gateway._controlplane import SnapshotRefused, decode_snapshot, merge_snapshot
from meshgate.gateway._gateway import Gateway, build_products
from meshgate.limits import MemoryCounters
from meshgate.policies import schemas
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.metrics import GatewayMetrics

SALT = "00112233445566778899aabbccddeeff"
SOURCE = "snapshot test"


def products() -> list[dict[str, Any]]:
    keyed = example_product(9, name="keyed", key_salt=SALT)
    keyed["policies"] = [
        {"cors": {"allow_origins": ["*"]}},
        {"headers": {"request": {"set": {"x-a": "1"}}}},
    ]
    keyed["applications"] = [
        {"id": f"app{i}", "plan": "basic", "key_hashes": [hash_key(SALT, f"key-{i}")]}
        for i in range(20)
    ]
    pair = example_product(9, name="pair", path_prefix="/pair", policies=[])
    pair["auth"] = {"type": "app_id_key"}
    jwt = example_product(9, name="jwt", path_prefix="/jwt")
    jwt["auth"] = {
        "type": "jwt",
        "keys": [{"secret": "s" * 32, "algorithm": "HS256"}],
        "algorithms": ["HS256"],
    }
    two = example_product(9, name="two", path_prefix="/two", hosts=["é.example.com"])
    del two["backend"]
    two["backends"] = [
        {"path": "/", "url": "http://127.0.0.1:9"},
        {"path": "/v2", "url": "http://127.0.0.1:10/base"},
    ]
    result: list[dict[str, Any]] = gateway_config([keyed, pair, jwt, two])["products"]
    return result


def published(items: list[dict[str, Any]], version: int = 1) -> bytes:
    """The document the control plane publishes for ``items``."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        compiled = snapshots.Compiled("production", items, [])
        for earlier in range(version - 1):
            content = snapshots.Compiled("production", [{"earlier": earlier}], [])
            snapshots.publish(session, "production", "earlier", content)
        snapshot = snapshots.publish(session, "production", "test", compiled)
        assert snapshot is not None
        return snapshot.document.encode()


def whole(settings: Config, body: bytes) -> Config:
    return merge_snapshot(settings, json.loads(body), SOURCE)


def refusal(settings: Config, body: bytes) -> str:
    with pytest.raises(SnapshotRefused) as caught:
        decode_snapshot(settings, body, SOURCE)
    return str(caught.value)


def whole_refusal(settings: Config, body: bytes) -> str:
    with pytest.raises(SnapshotRefused) as caught:
        whole(settings, body)
    return str(caught.value)


def test_published_document_is_a_product_a_line_with_the_canonical_digest() -> None:
    items = products()
    body = published(items, version=3)
    lines = body.split(b"\n")
    assert lines[0] == b'{"version":"3","products":['
    assert lines[-1] == b"]}"
    assert len(lines) == len(items) + 2
    assert json.loads(body) == {"version": "3", "products": items}
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        snapshot = snapshots.publish(session, "e", "r", snapshots.Compiled("e", items, []))
        assert snapshot is not None
        assert snapshot.digest == snapshots.canonical(items)[1]
        assert snapshot.size == len(snapshot.document.encode())
        # The same content is not a new version.
        assert snapshots.publish(session, "e", "r", snapshots.Compiled("e", items, [])) is None
        empty = snapshots.publish(session, "e", "r", snapshots.Compiled("e", [], []))
        assert empty is not None and empty.document == '{"version":"2","products":[]}'


def test_same_config_as_the_whole_document(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Config(listen="127.0.0.1:9999", access_log=False)
    body = published(products())
    handovers = []
    monkeypatch.setattr(_controlplane.time, "sleep", handovers.append)
    by_product = _controlplane._decode_by_product(settings, body, SOURCE)
    assert by_product is not None
    assert handovers == [0] * len(products())
    expected = whole(settings, body)
    assert by_product == expected
    assert by_product.listen == "127.0.0.1:9999" and by_product.version == "1"
    assert decode_snapshot(settings, body, SOURCE) == expected
    assert gc.isenabled()


@pytest.mark.parametrize(
    ("where", "change", "path"),
    [
        (2, {"plans": [{"name": "basic", "limits": [{"period": "fortnight"}]}]}, "products[2]"),
        (0, {"policies": [{"cors": {"allow_origins": "everyone"}}]}, "products[0].policies"),
        (3, {"policies": [{"future_policy": {}}]}, "products[3].policies[0]"),
        (1, {"name": "keyed"}, "top level"),
        (1, {"auth": {"type": "no"}}, "products[1].auth"),
    ],
)
def test_a_bad_product_is_refused_as_the_whole_document_refuses_it(
    where: int, change: dict[str, Any], path: str
) -> None:
    settings = Config()
    items = products()
    items[where].update(change)
    body = published(items)
    assert _controlplane._decode_by_product(settings, body, SOURCE) is None
    message = refusal(settings, body)
    assert message == whole_refusal(settings, body)
    assert path in message


def test_a_product_alone_has_the_errors_it_has_in_the_document() -> None:
    items = products()
    items[2]["plans"][0]["limits"][0]["period"] = "fortnight"
    items[2]["policies"] = [{"cors": {"allow_origins": "everyone"}}]
    items[2]["hosts"] = "one"
    with pytest.raises(ConfigError) as in_document:
        validate_snapshot({"products": items}, SOURCE, policy_schemas=schemas())
    with pytest.raises(ConfigError) as alone:
        validate_snapshot_product(items[2], 2, SOURCE, policy_schemas=schemas())
    assert alone.value.errors == in_document.value.errors
    assert alone.value.errors[0].startswith("products[2].hosts:")
    items[2]["hosts"] = ["*"]
    with pytest.raises(ConfigError) as in_document:
        validate_snapshot({"products": items}, SOURCE, policy_schemas=schemas())
    with pytest.raises(ConfigError) as alone:
        validate_snapshot_product(items[2], 2, SOURCE, policy_schemas=schemas())
    assert alone.value.errors == in_document.value.errors
    items[2]["plans"][0]["limits"][0]["period"] = "day"
    with pytest.raises(ConfigError) as in_document:
        validate_snapshot({"products": items}, SOURCE, policy_schemas=schemas())
    with pytest.raises(ConfigError) as alone:
        validate_snapshot_product(items[2], 2, SOURCE, policy_schemas=schemas())
    assert alone.value.errors == in_document.value.errors
    assert alone.value.errors[0].startswith("products[2].policies[0].cors.allow_origins:")
    with pytest.raises(ConfigError) as alone:
        validate_snapshot_product([], 7, SOURCE)
    assert alone.value.errors == ["products[7]: must be a mapping"]


def other_layouts() -> dict[str, bytes]:
    items = products()
    doc = {"version": "1", "products": items}
    lines = [json.dumps(p) for p in items]
    return {
        "compact": json.dumps(doc, separators=(",", ":")).encode(),
        "indented": json.dumps(doc, indent=2).encode(),
        "crlf": ('{"version":"1","products":[\r\n' + ",\r\n".join(lines) + "\r\n]}").encode(),
        "two a line": (
            '{"version":"1","products":[\n'
            + ",".join(lines[:2])
            + ",\n"
            + ",\n".join(lines[2:])
            + "\n]}"
        ).encode(),
        "products first": ('{"products":[\n' + ",\n".join(lines) + '\n],"version":"1"}').encode(),
        "no products": b'{"version":"1","products":[\n]}',
        "products then another array": (
            '{"version":"1","products":[],"version":[\n' + ",\n".join(lines) + "\n]}"
        ).encode(),
        "key ending in products": (
            '{"version":"1","x\\"products":[\n' + ",\n".join(lines) + "\n]}"
        ).encode(),
        "trailing comma": ('{"version":"1","products":[\n' + ",\n".join(lines) + ",\n]}").encode(),
        "extra field": (
            '{"listen":"0.0.0.0:1","version":"1","products":[\n' + ",\n".join(lines) + "\n]}"
        ).encode(),
        "version a number": ('{"version":1,"products":[\n' + ",\n".join(lines) + "\n]}").encode(),
        "not JSON": b'{"version":"1","products":[\n{"name":\n]}',
    }


@pytest.mark.parametrize("name", list(other_layouts()))
def test_other_layouts_are_decoded_as_a_whole(name: str) -> None:
    settings = Config()
    body = other_layouts()[name]
    by_product = _controlplane._decode_by_product(settings, body, SOURCE)
    try:
        json.loads(body)
    except ValueError:
        assert by_product is None
        assert refusal(settings, body).startswith(f"{SOURCE}: not a JSON document:")
        return
    try:
        expected = whole(settings, body)
    except SnapshotRefused:
        assert by_product is None
        assert refusal(settings, body) == whole_refusal(settings, body)
        return
    assert by_product is None or by_product == expected
    assert decode_snapshot(settings, body, SOURCE) == expected


def test_products_built_one_at_a_time_serve_as_those_built_at_once() -> None:
    config = decode_snapshot(Config(), published(products()), SOURCE)

    async def build() -> tuple[Gateway, Gateway]:
        pools: dict[Any, Any] = {}
        at_once = Gateway(config, MemoryCounters(), GatewayMetrics(), pools, AccessLog())
        built = await build_products(config, pools)
        in_pieces = Gateway(config, MemoryCounters(), GatewayMetrics(), pools, AccessLog(), built)
        return at_once, in_pieces

    loop = asyncio.new_event_loop()
    try:
        at_once, in_pieces = loop.run_until_complete(build())
        assert [p.name for p in in_pieces.products] == [p.name for p in at_once.products]
        for a, b in zip(at_once.products, in_pieces.products, strict=True):
            assert a.pool is b.pool and a.limits == b.limits and a.scopes == b.scopes
        for host, path in [("x", "/echo/a"), ("é.example.com", "/two/v2/x"), ("x", "/jwt")]:
            matched, again = at_once.router.match(host, path), in_pieces.router.match(host, path)
            assert (matched and matched.name) == (again and again.name)
        del at_once, in_pieces
        gc.collect()
        gc.disable()
        try:
            built = loop.run_until_complete(build())
            del built
            assert gc.collect() == 0  # no reference cycle left behind
        finally:
            gc.enable()
    finally:
        loop.close()


def test_a_replaced_gateway_is_dismantled_product_by_product() -> None:
    async def run() -> None:
        config = decode_snapshot(Config(), published(products()), SOURCE)
        gateway = Gateway(config, MemoryCounters(), GatewayMetrics(), {}, AccessLog())
        held = gateway.products[1]
        del config
        steps = 0
        task = asyncio.ensure_future(gateway.dismantle())
        while not task.done():
            steps += 1
            await asyncio.sleep(0)
        assert steps >= len(products())
        assert gateway.products == [] and gateway.config.products == []
        assert gateway.router.match("x", "/echo") is None
        assert held.name == "pair" and held.config.name == "pair"  # a request in flight's

        # A configuration held elsewhere is left whole.
        config = decode_snapshot(Config(), published(products()), SOURCE)
        gateway = Gateway(config, MemoryCounters(), GatewayMetrics(), {}, AccessLog())
        await gateway.dismantle()
        assert gateway.products == [] and len(config.products) == len(products())

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
