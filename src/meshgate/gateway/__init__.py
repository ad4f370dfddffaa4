"""The edge gateway role: products, credentials, mapping rules and plan limits."""

from meshgate.gateway._controlplane import ControlPlaneOptions, cache_file, write_cache
from meshgate.gateway._gateway import Gateway, ProductRuntime
from meshgate.gateway._runner import (
    GatewayProcess,
    GatewayStartError,
    load_gateway_config,
    load_local_settings,
    run_gateway,
)

__all__ = [
    "ControlPlaneOptions",
    "Gateway",
    "GatewayProcess",
    "GatewayStartError",
    "ProductRuntime",
    "cache_file",
    "load_gateway_config",
    "load_local_settings",
    "run_gateway",
    "write_cache",
]
