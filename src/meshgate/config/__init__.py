"""The declarative gateway configuration: model, loading with precise errors, JSON Schema.

The names below load their module on first use: a sidecar, which reads only
``meshgate.config.mesh``, does not build the gateway's models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshgate.config.loader import (
        MAX_SNAPSHOT_BYTES,
        ConfigError,
        load_config,
        parse_config,
        parse_snapshot,
        validate_snapshot,
    )
    from meshgate.config.model import (
        PERIODS,
        ApiKeyAuth,
        AppIdKeyAuth,
        Application,
        Auth,
        BackendUsage,
        Config,
        JwtAuth,
        JwtKey,
        Limit,
        LimitsConfig,
        MappingRule,
        Method,
        Metric,
        NoAuth,
        Period,
        Plan,
        Product,
        Timeouts,
    )
    from meshgate.config.schema import json_schema, write_schema
    from meshgate.config.secrets import hash_key, new_admin_token, new_key, new_salt

_LAZY = {
    "MAX_SNAPSHOT_BYTES": "meshgate.config.loader",
    "ConfigError": "meshgate.config.loader",
    "load_config": "meshgate.config.loader",
    "parse_config": "meshgate.config.loader",
    "parse_snapshot": "meshgate.config.loader",
    "validate_snapshot": "meshgate.config.loader",
    "PERIODS": "meshgate.config.model",
    "ApiKeyAuth": "meshgate.config.model",
    "AppIdKeyAuth": "meshgate.config.model",
    "Application": "meshgate.config.model",
    "Auth": "meshgate.config.model",
    "BackendUsage": "meshgate.config.model",
    "Config": "meshgate.config.model",
    "JwtAuth": "meshgate.config.model",
    "JwtKey": "meshgate.config.model",
    "Limit": "meshgate.config.model",
    "LimitsConfig": "meshgate.config.model",
    "MappingRule": "meshgate.config.model",
    "Method": "meshgate.config.model",
    "Metric": "meshgate.config.model",
    "NoAuth": "meshgate.config.model",
    "Period": "meshgate.config.model",
    "Plan": "meshgate.config.model",
    "Product": "meshgate.config.model",
    "Timeouts": "meshgate.config.model",
    "json_schema": "meshgate.config.schema",
    "write_schema": "meshgate.config.schema",
    "hash_key": "meshgate.config.secrets",
    "new_admin_token": "meshgate.config.secrets",
    "new_key": "meshgate.config.secrets",
    "new_salt": "meshgate.config.secrets",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshgate.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MAX_SNAPSHOT_BYTES",
    "PERIODS",
    "ApiKeyAuth",
    "AppIdKeyAuth",
    "Application",
    "BackendUsage",
    "Auth",
    "Config",
    "ConfigError",
    "JwtAuth",
    "JwtKey",
    "Limit",
    "LimitsConfig",
    "MappingRule",
    "Method",
    "Metric",
    "NoAuth",
    "Period",
    "Plan",
    "Product",
    "Timeouts",
    "hash_key",
    "json_schema",
    "new_admin_token",
    "new_key",
    "new_salt",
    "load_config",
    "parse_config",
    "parse_snapshot",
    "validate_snapshot",
    "write_schema",
]
