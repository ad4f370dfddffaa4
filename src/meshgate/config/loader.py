"""Load the gateway configuration from YAML or JSON text, reporting every problem by path."""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from meshgate.config._fields import _Strict
from meshgate.config._parse import (  # noqa: F401 (re-exported)
    _EXPONENT_FLOAT,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    MAX_SNAPSHOT_BYTES,
    ConfigError,
    DepthLimitedLoader,
    _kind_of,
    _messages,
    _no_collection,
    _parse_yaml,
    _policy_name,
    _read,
    _too_large,
    _validate,
)
from meshgate.config.mesh import Service, load_mesh, parse_mesh, validate_mesh  # noqa: F401
from meshgate.config.model import Config, Product

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_SNAPSHOT_BYTES",
    "ConfigError",
    "DepthLimitedLoader",
    "assemble_snapshot",
    "load_config",
    "load_declarative",
    "parse_config",
    "parse_declarative",
    "parse_snapshot",
    "validate_snapshot",
    "validate_snapshot_product",
]

PolicySchemas = Mapping[str, type[BaseModel]]


def load_config(
    path: str | os.PathLike[str],
    *,
    policy_schemas: PolicySchemas | None = None,
    max_bytes: int = MAX_BYTES,
) -> Config:
    """Read and validate the configuration file at ``path``."""
    source = os.fspath(path)
    return parse_config(
        _read(source, max_bytes), source, policy_schemas=policy_schemas, max_bytes=max_bytes
    )


def parse_config(
    text: str | bytes,
    source: str = "<string>",
    *,
    policy_schemas: PolicySchemas | None = None,
    max_bytes: int = MAX_BYTES,
) -> Config:
    """Validate YAML or JSON ``text``; with ``policy_schemas``, check each policy's config too.

    ``max_bytes`` is for hand-written files by default; a control plane's snapshot of a large
    model is bigger (pass :data:`MAX_SNAPSHOT_BYTES`)."""
    return _config_of(_parse_yaml(text, source, max_bytes), source, policy_schemas)


def _config_of(data: dict[str, Any], source: str, policy_schemas: PolicySchemas | None) -> Config:
    if policy_schemas is not None:
        _validate(_validation_model(tuple(policy_schemas.items())), data, source)
    return _validate(Config, data, source)


def parse_snapshot(
    text: str | bytes, source: str = "<snapshot>", *, policy_schemas: PolicySchemas | None = None
) -> Config:
    """Validate a control plane's snapshot: JSON written by a program, not by hand.

    The same model and errors as :func:`parse_config`, without the checks that guard against
    hand-written and hostile files at a cost a snapshot of 100,000 keys notices (duplicate
    keys, YAML); its size limit is :data:`MAX_SNAPSHOT_BYTES`."""
    if len(text) > MAX_SNAPSHOT_BYTES:
        raise ConfigError([_too_large(len(text), MAX_SNAPSHOT_BYTES)], source)
    with _no_collection():
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError([f"not a JSON snapshot: {exc}"], source) from None
        return validate_snapshot(data, source, policy_schemas=policy_schemas)


def validate_snapshot(
    data: Any, source: str = "<snapshot>", *, policy_schemas: PolicySchemas | None = None
) -> Config:
    """:func:`parse_snapshot` for a document already parsed from JSON."""
    if not isinstance(data, dict):
        raise ConfigError([f"top level: must be a mapping, got {_kind_of(data)}"], source)
    with _no_collection():
        config = _validate(Config, data, source)
        if policy_schemas is not None and any(p.policies for p in config.products):
            _check_policies(data, source, policy_schemas)
    return config


def validate_snapshot_product(
    data: Any,
    index: int,
    source: str = "<snapshot>",
    *,
    policy_schemas: PolicySchemas | None = None,
) -> Product:
    """Product ``index`` of a snapshot, validated alone as :func:`validate_snapshot` validates
    it in the document (strictly, its policies against ``policy_schemas``): the same errors,
    at ``products[index]``. A large snapshot validated product by product never holds the GIL
    for long; :func:`assemble_snapshot` then makes the ``Config`` of the products."""
    wrapped = {"products": [data]}
    try:
        with _no_collection():
            config = _validate(Config, wrapped, source)
            if policy_schemas is not None and config.products[0].policies:
                _check_policies(wrapped, source, policy_schemas)
    except ConfigError as exc:
        raise ConfigError([_renumber(error, index) for error in exc.errors], source) from None
    return config.products[0]


def assemble_snapshot(
    products: list[Product], fields: Mapping[str, Any], source: str = "<snapshot>"
) -> Config:
    """The snapshot of ``products`` (each from :func:`validate_snapshot_product`) and its
    other ``fields`` (its version): checked as a whole as :func:`validate_snapshot` checks it
    (unique product names, the version) without validating the products again."""
    # Validating the products again, even as instances, would run each product's checks
    # again in one call holding the GIL: the other fields alone, then the products' names.
    config = _validate(Config, {**fields, "products": []}, source)
    names = [p.name for p in products]
    if len(set(names)) != len(names):
        _validate(Config, {**fields, "products": products}, source)  # says what is wrong
    return config.model_copy(update={"products": products})


def _renumber(error: str, index: int) -> str:
    first = "products[0]"
    return f"products[{index}]{error[len(first) :]}" if error.startswith(first) else error


def _check_policies(data: dict[str, Any], source: str, policy_schemas: PolicySchemas) -> None:
    # On the products alone: their plans and applications were checked already.
    light = {
        "products": [
            {**p, "plans": [], "applications": []} if p.get("policies") else {}
            for p in data["products"]
        ]
    }
    model = _validation_model(tuple(policy_schemas.items()))
    try:
        model.model_validate(light, strict=True)
    except ValidationError as exc:
        problems = [m for m in _messages(exc, model) if ".policies" in m.split(":")[0]]
        if problems:
            raise ConfigError(problems, source) from None


def _no_policy_known(entry: dict[str, Any]) -> dict[str, Any]:
    raise ValueError(f"unknown policy {', '.join(map(repr, entry)) or '{}'} (no policy is known)")


@functools.lru_cache(maxsize=16)
def _validation_model(policies: tuple[tuple[str, type[BaseModel]], ...]) -> type[Config]:
    """``Config`` whose policy entries are validated against the known policies' models."""
    entry: Any
    if policies:
        members = tuple(
            Annotated[
                create_model(
                    re.sub(r"[^0-9A-Za-z]", "", name.title()) + "Policy",
                    __config__=ConfigDict(extra="forbid", frozen=True),
                    __doc__=f"The {name} policy and its configuration.",
                    config=(schema, Field(alias=name)),
                ),
                Tag(name),
            ]
            for name, schema in policies
        )
        entry = Annotated[Union[members], Discriminator(_policy_name)]  # noqa: UP007
    else:
        entry = Annotated[
            dict[str, Any], AfterValidator(_no_policy_known), WithJsonSchema({"not": {}})
        ]
    description = Product.model_fields["policies"].description
    product: Any = create_model(
        "Product",
        __base__=Product,
        __doc__=Product.__doc__,
        policies=(list[entry], Field([], description=description)),
    )
    return create_model(
        "Config", __base__=Config, __doc__=Config.__doc__, products=(list[product], Field([]))
    )


def load_declarative(
    path: str | os.PathLike[str],
    *,
    policy_schemas: PolicySchemas | None = None,
    max_bytes: int = MAX_BYTES,
) -> tuple[Config, list[Service] | None]:
    """Read and validate a control plane's declarative file (see :func:`parse_declarative`)."""
    source = os.fspath(path)
    return parse_declarative(
        _read(source, max_bytes), source, policy_schemas=policy_schemas, max_bytes=max_bytes
    )


def parse_declarative(
    text: str | bytes,
    source: str = "<string>",
    *,
    policy_schemas: PolicySchemas | None = None,
    max_bytes: int = MAX_BYTES,
) -> tuple[Config, list[Service] | None]:
    """A control plane's declarative file: the gateway file format, and the mesh's services
    in an optional ``mesh: {services: [...]}`` section (None when the file has none); every
    error of both parts with its path.

    Each service is checked on its own; whether they refer to each other rightly depends on
    the services the control plane keeps beside them, and it checks that."""
    data = _parse_yaml(text, source, max_bytes)
    present = "mesh" in data
    mesh = data.pop("mesh", None)
    errors: list[str] = []
    config: Config | None = None
    try:
        config = _config_of(data, source, policy_schemas)
    except ConfigError as exc:
        errors += exc.errors
    section: _MeshSection | None = None
    if present:
        if not isinstance(mesh, dict):
            errors.append(f"mesh: must be a mapping with services, got {_kind_of(mesh)}")
        else:
            try:
                section = _validate(_MeshSection, mesh, source)
            except ConfigError as exc:
                errors += [_under("mesh", line) for line in exc.errors]
    if errors:
        raise ConfigError(errors, source)
    assert config is not None
    return config, None if section is None else list(section.services)


class _MeshSection(_Strict):
    """A declarative file's ``mesh`` section: services, each valid on its own."""

    services: list[Service] = Field(max_length=10_000)

    @model_validator(mode="after")
    def _unique(self) -> _MeshSection:
        counts = collections.Counter(s.name for s in self.services)
        twice = sorted(name for name, count in counts.items() if count > 1)
        if twice:
            raise ValueError(f"service names must be unique: {', '.join(twice)} given twice")
        return self


def _under(prefix: str, line: str) -> str:
    """An error of a nested document as its parent has it: ``services[0].port: ...`` becomes
    ``mesh.services[0].port: ...``."""
    path, _, message = line.partition(": ")
    if path == "top level":
        # Cross-reference problems name their own path in the message.
        inner, sep, rest = message.partition(": ")
        if sep and inner.startswith("services["):
            return f"{prefix}.{inner}: {rest}"
        return f"{prefix}: {message}"
    return f"{prefix}.{path}: {message}"
