"""The JSON Schema of the gateway configuration file, generated from the pydantic model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from meshgate.config.loader import _validation_model
from meshgate.config.model import Config

__all__ = ["SCHEMA_ID", "json_schema", "write_schema"]

SCHEMA_ID = "https://meshgate.dev/schemas/gateway.schema.json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(policy_schemas: Mapping[str, type[BaseModel]] | None = None) -> dict[str, Any]:
    """The schema of a configuration file; policy entries are narrowed to the given policies."""
    model = Config if policy_schemas is None else _validation_model(tuple(policy_schemas.items()))
    generated = model.model_json_schema(mode="validation")
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": _DIALECT,
        "$id": SCHEMA_ID,
        "title": "meshgate gateway configuration",
        "description": "A gateway's listeners, limits backend and API products, as YAML or JSON.",
        **generated,
    }


def write_schema(
    path: str | os.PathLike[str], policy_schemas: Mapping[str, type[BaseModel]] | None = None
) -> None:
    """Write :func:`json_schema` to ``path`` as indented JSON."""
    text = json.dumps(json_schema(policy_schemas), indent=2, ensure_ascii=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")
