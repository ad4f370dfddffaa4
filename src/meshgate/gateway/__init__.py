"""The edge gateway role: products, credentials, mapping rules and plan limits."""

from meshgate.gateway._gateway import Gateway, ProductRuntime
from meshgate.gateway._runner import (
    GatewayProcess,
    GatewayStartError,
    load_gateway_config,
    run_gateway,
)

__all__ = [
    "Gateway",
    "GatewayProcess",
    "GatewayStartError",
    "ProductRuntime",
    "load_gateway_config",
    "run_gateway",
]
