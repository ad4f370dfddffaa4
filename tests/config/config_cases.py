"""Shared inputs for the configuration tests: the documented example and small policy models."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from meshgate.config import ConfigError, parse_config

EXAMPLE = """\
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:8081
limits:
  backend: memory            # or: redis, with redis_url: redis://127.0.0.1:6379/0
products:
  - name: echo
    hosts: ["*"]
    path_prefix: /echo
    backend: http://127.0.0.1:9001
    auth: {type: api_key, header: X-API-Key}
    metrics:
      - {name: hits}
      - {name: search, parent: hits}
    mapping_rules:
      - {method: GET, pattern: "/search", metric: search, last: true}
      - {method: ANY, pattern: "/", metric: hits}
    plans:
      - name: basic
        limits:
          - {metric: hits, period: minute, value: 5}
          - {metric: search, period: day, value: 1000}
    policies:
      - cors: {allow_origins: ["*"]}
    applications:
      - {id: app1, plan: basic, keys: [k1]}
"""


class CorsConfig(BaseModel):
    """Stands in for the real cors policy's model (named Config like theirs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    allow_origins: list[str] = ["*"]
    max_age: int = Field(600, ge=0)


class HeadersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    set: dict[str, str] = {}
    remove: list[str] = []


class Config(BaseModel):
    """Named like the gateway's own Config, to exercise schema name clashes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    message: str = "down for maintenance"
    status: int = Field(503, ge=400, le=599)


POLICIES: dict[str, type[BaseModel]] = {
    "cors": CorsConfig,
    "headers": HeadersConfig,
    "maintenance": Config,
}


def example() -> dict[str, Any]:
    """The example as a fresh, mutable dict."""
    return copy.deepcopy(_EXAMPLE_DATA)


_EXAMPLE_DATA = yaml.safe_load(EXAMPLE)


def errors_of(data: dict[str, Any] | str, **kwargs: Any) -> list[str]:
    """The error lines parse_config reports for data (a dict is sent as JSON)."""
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(ConfigError) as info:
        parse_config(text, **kwargs)
    return info.value.errors
