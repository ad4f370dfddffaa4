"""A control plane's snapshot parses to the same model, with the same errors, as a file."""

from __future__ import annotations

import gc
import json

import pytest
from config_cases import example

from meshgate.config import MAX_SNAPSHOT_BYTES, ConfigError, parse_config, parse_snapshot
from meshgate.policies import schemas


def snapshot_errors(data: object) -> list[str]:
    text = data if isinstance(data, (str, bytes)) else json.dumps(data)
    with pytest.raises(ConfigError) as caught:
        parse_snapshot(text, policy_schemas=schemas())
    return caught.value.errors


def test_same_model_as_the_file_loader() -> None:
    text = json.dumps(example())
    assert parse_snapshot(text, policy_schemas=schemas()) == parse_config(
        text, policy_schemas=schemas()
    )


def test_field_errors_name_their_path() -> None:
    data = example()
    data["products"][0]["plans"][0]["limits"][0]["period"] = "fortnight"
    [error] = snapshot_errors(data)
    assert error.startswith("products[0].plans[0].limits[0].period: must be one of")


def test_policy_configuration_is_checked_against_the_known_policies() -> None:
    data = example()
    data["products"][0]["policies"] = [{"cors": {"allow_origins": "everyone"}}]
    [error] = snapshot_errors(data)
    assert error.startswith("products[0].policies[0].cors.allow_origins:")
    data["products"][0]["policies"] = [{"future_policy": {}}]
    [error] = snapshot_errors(data)
    assert "future_policy" in error and error.startswith("products[0].policies[0]")


def test_not_json_or_not_a_mapping_is_refused() -> None:
    assert snapshot_errors("{not json")[0].startswith("not a JSON snapshot:")
    assert snapshot_errors("[1, 2]") == ["top level: must be a mapping, got a list"]
    assert snapshot_errors(b"\xff\xfe{}")[0].startswith("not a JSON snapshot:")
    deep = "[" * 100_000 + "]" * 100_000
    assert snapshot_errors('{"products": ' + deep + "}")[0].startswith("not a JSON snapshot:")


def test_oversized_snapshot_is_refused_before_parsing() -> None:
    text = b" " * (MAX_SNAPSHOT_BYTES + 1)
    with pytest.raises(ConfigError) as caught:
        parse_snapshot(text)
    assert caught.value.errors == [
        f"too large: {MAX_SNAPSHOT_BYTES + 1} bytes, the limit is 256 MiB"
    ]


def test_the_collector_is_enabled_again_after_a_refusal() -> None:
    assert gc.isenabled()
    snapshot_errors("{not json")
    assert gc.isenabled()
