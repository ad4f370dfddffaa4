"""JSON Schema files for the ``validate`` step: read with the configuration loader's limits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema

from meshgate.config.loader import ConfigError, _parse_yaml, _read

__all__ = ["load_schema"]


def load_schema(path: str, base_dir: str | os.PathLike[str] | None) -> Any:
    """The schema at ``path`` (relative to ``base_dir``), checked against its meta-schema.

    Raises ``ValueError`` with a message that names the problem.
    """
    full = Path(base_dir or ".") / path
    try:
        # The configuration loader already refuses oversized, non-UTF-8 and hostile files
        # (YAML bombs, deep nesting, duplicate keys); a JSON file is YAML too.
        schema = _parse_yaml(_read(os.fspath(full)), os.fspath(full))
    except ConfigError as exc:
        raise ValueError(f"schema {path!r}: {'; '.join(exc.errors)}") from None
    check_schema(schema, path)
    return schema


def check_schema(schema: Any, name: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise ValueError(
            f"schema {name!r} is not a valid JSON Schema: {where or 'top'}: {exc.message}"
        ) from None
