"""Schemathesis hooks for the admin API run (loaded through ``SCHEMATHESIS_HOOKS``).

Ids are narrowed to the few that the test seeded, so that generated requests reach existing
resources (updates, transitions, deletes) instead of stopping at 404; the documented bounds
still drive the negative cases below and above the range.
"""

from __future__ import annotations

from typing import Any

import schemathesis

# The test seeds at least this many rows of each kind.
SEEDED = 4


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    for operations in raw_schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", ()):
                schema = parameter.get("schema", {})
                if parameter.get("in") == "path" and schema.get("type") == "integer":
                    schema["maximum"] = SEEDED
