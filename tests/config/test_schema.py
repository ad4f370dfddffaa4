"""The JSON Schema agrees with the model on valid and invalid files; the shipped one is current."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from config_cases import POLICIES, example

import meshgate.config
from meshgate.config import ConfigError, json_schema, parse_config, write_schema
from meshgate.config.schema import SCHEMA_ID

SHIPPED = Path(meshgate.config.__file__).with_name("gateway.schema.json")


def validator(policy_schemas: Any = None) -> jsonschema.Draft202012Validator:
    schema = json_schema(policy_schemas)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def model_accepts(data: dict[str, Any], policy_schemas: Any = None) -> bool:
    try:
        parse_config(json.dumps(data), policy_schemas=policy_schemas)
    except ConfigError:
        return False
    return True


def changed(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """The example with the value at path replaced (or deleted when value is DELETE)."""
    data = example()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()
P0 = ("products", 0)

VALID = {
    "example": example(),
    "empty": {},
    "jwt": changed(
        (*P0, "auth"), {"type": "jwt", "jwks_url": "http://idp/jwks", "audience": ["a"]}
    ),
    "app_id_key": changed((*P0, "auth"), {"type": "app_id_key", "app_id_query": None}),
    "no admin": changed(("admin_listen",), None),
    "no policies": changed((*P0, "policies"), []),
    "redis": changed(("limits",), {"backend": "redis", "redis_url": "redis://r:6379/1"}),
    "h2c backend": changed((*P0, "protocol"), "h2c"),
}

INVALID = {
    "unknown period": changed((*P0, "plans", 0, "limits", 0, "period"), "fortnight"),
    "missing backend": changed((*P0, "backend"), DELETE),
    "missing auth type": changed((*P0, "auth"), {"header": "X-Key"}),
    "unknown auth type": changed((*P0, "auth", "type"), "saml"),
    "field of another auth type": changed((*P0, "auth", "issuer"), "me"),
    "unknown top-level field": changed(("listener",), "0.0.0.0:80"),
    "unknown product field": changed((*P0, "upstream"), "http://x"),
    "value as text": changed((*P0, "plans", 0, "limits", 0, "value"), "5"),
    "negative value": changed((*P0, "plans", 0, "limits", 0, "value"), -1),
    "fractional value": changed((*P0, "plans", 0, "limits", 0, "value"), 1.5),
    "boolean value": changed((*P0, "plans", 0, "limits", 0, "value"), True),
    "listen as number": changed(("listen",), 8080),
    "hosts as text": changed((*P0, "hosts"), "*"),
    "unknown method": changed((*P0, "mapping_rules", 0, "method"), "FETCH"),
    "bad product name": changed((*P0, "name"), "my product"),
    "small header limit": changed(("max_header_size",), 100),
    "zero timeout": changed(("timeouts",), {"client_header": 0}),
    "empty policy entry": changed((*P0, "policies"), [{}]),
    "two policies in one entry": changed((*P0, "policies"), [{"cors": {}, "headers": {}}]),
    "policy entry as text": changed((*P0, "policies"), ["cors"]),
    "policy config as list": changed((*P0, "policies"), [{"cors": []}]),
    "application state": changed((*P0, "applications", 0, "state"), "paused"),
    "jwt leeway": changed((*P0, "auth"), {"type": "jwt", "jwks_url": "u", "leeway_seconds": 301}),
    "unknown protocol": changed((*P0, "protocol"), "http3"),
}

INVALID_WITH_POLICIES = {
    "unknown policy": changed((*P0, "policies"), [{"corz": {}}]),
    "policy field type": changed((*P0, "policies"), [{"cors": {"allow_origins": "*"}}]),
    "unknown policy field": changed((*P0, "policies"), [{"cors": {"origins": ["*"]}}]),
    "policy bound": changed((*P0, "policies"), [{"maintenance": {"status": 200}}]),
}


def test_h2_is_http2_over_tls_and_needs_an_https_backend() -> None:
    for protocol in ("h2", "h2c"):
        on_backend = changed((*P0, "backend"), DELETE)
        on_backend["products"][0]["backends"] = [
            {"path": "/", "url": "http://127.0.0.1:9001", "protocol": protocol}
        ]
        for data in (changed((*P0, "protocol"), protocol), on_backend):
            if protocol == "h2c":
                assert model_accepts(data)
                continue
            with pytest.raises(ConfigError, match="h2 is HTTP/2 over TLS"):
                parse_config(json.dumps(data))


def test_schema_header() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == SCHEMA_ID == "https://meshgate.dev/schemas/gateway.schema.json"
    assert schema["title"] == "meshgate gateway configuration"
    assert schema["description"]
    assert list(schema)[:4] == ["$schema", "$id", "title", "description"]
    assert "Usage docs" not in json.dumps(json_schema(POLICIES))


@pytest.mark.parametrize("name", VALID)
@pytest.mark.parametrize("policies", [None, POLICIES], ids=["open", "known"])
def test_valid_files_pass_both(name: str, policies: Any) -> None:
    data = VALID[name]
    assert model_accepts(data, policies)
    validator(policies).validate(data)


@pytest.mark.parametrize("name", INVALID)
@pytest.mark.parametrize("policies", [None, POLICIES], ids=["open", "known"])
def test_invalid_files_fail_both(name: str, policies: Any) -> None:
    data = INVALID[name]
    assert not model_accepts(data, policies)
    assert not validator(policies).is_valid(data)


@pytest.mark.parametrize("name", INVALID_WITH_POLICIES)
def test_policy_configs_are_checked_only_when_policies_are_known(name: str) -> None:
    data = INVALID_WITH_POLICIES[name]
    assert model_accepts(data)
    assert validator().is_valid(data)
    assert not model_accepts(data, POLICIES)
    assert not validator(POLICIES).is_valid(data)


def test_policy_items_are_one_of_the_known_policies() -> None:
    schema = json_schema(POLICIES)
    product = schema["$defs"]["Product"]["properties"]["policies"]
    refs = [choice["$ref"] for choice in product["items"]["oneOf"]]
    assert refs == ["#/$defs/CorsPolicy", "#/$defs/HeadersPolicy", "#/$defs/MaintenancePolicy"]
    maintenance = schema["$defs"]["MaintenancePolicy"]
    assert maintenance["required"] == ["maintenance"]
    assert maintenance["additionalProperties"] is False
    # The policy model named Config must not shadow or replace the gateway's own Config.
    target = maintenance["properties"]["maintenance"]["$ref"].removeprefix("#/$defs/")
    assert schema["$defs"][target]["properties"]["status"]["maximum"] == 599
    assert "products" in schema["properties"]


def test_no_known_policies_allows_no_entries() -> None:
    check = validator({})
    assert check.is_valid(changed((*P0, "policies"), []))
    assert not check.is_valid(example())
    assert not model_accepts(example(), {})


def test_schema_is_stable_and_json() -> None:
    first = json_schema(POLICIES)
    assert json.loads(json.dumps(first)) == first == json_schema(dict(POLICIES))
    untouched = copy.deepcopy(first)
    first["$defs"].clear()
    assert json_schema(POLICIES) == untouched


def test_write_schema(tmp_path: Path) -> None:
    path = tmp_path / "gateway.schema.json"
    write_schema(path, POLICIES)
    assert json.loads(path.read_text(encoding="utf-8")) == json_schema(POLICIES)
    assert path.read_text(encoding="utf-8").endswith("}\n")
    write_schema(str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == json_schema()


def test_shipped_schema_is_current() -> None:
    if not SHIPPED.exists():
        pytest.skip(f"{SHIPPED.name} is not generated yet (meshgate schema --output ...)")
    try:
        from meshgate.policies import schemas
    except ImportError as exc:
        pytest.skip(f"meshgate.policies is not importable: {exc}")
    real = schemas()
    if not real:
        pytest.skip("meshgate.policies has no policy schemas yet")
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert shipped == json_schema(real), "regenerate it: meshgate schema --output " + str(SHIPPED)
