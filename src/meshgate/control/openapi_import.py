"""Products from OpenAPI 3.x documents, as 3scale's toolbox imports them.

One method (a metric under ``hits``) per operation, named after its ``operationId``; one
mapping rule per operation, the path as written (``{param}`` is the gateway's wildcard too)
and exact (``$``), concrete paths before templated ones and each rule ``last``, so that a
request counts against exactly one method; a request matching no operation is refused (404).
Paths are relative to the first server's URL: its path becomes the backend's base path.

The document owns the product's methods and mapping rules; a re-import adds and removes them
to match and keeps everything else (other metrics, plans and their limits on kept metrics,
applications, keys). The document itself is stored for the developer portal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import unquote

import yaml
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from meshgate.config import Config
from meshgate.config.loader import MAX_BYTES, DepthLimitedLoader
from meshgate.config.model import check_backend_url, check_path_prefix
from meshgate.control._auth import Actor
from meshgate.control._crud import audit
from meshgate.control._problems import Problem
from meshgate.control.declarative import FieldErrors, Options, Outcome, export_document, synchronise
from meshgate.control.models import Product

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "ImportOptions",
    "ImportOutcome",
    "Spec",
    "import_openapi",
    "parse_document",
    "check_backend",
    "check_prefix",
    "read_spec",
]

# Schemas nest deeper than gateway files; aliases are expanded against MAX_NODES.
MAX_DEPTH = 100
MAX_NODES = 1_000_000
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
OIDC_SUFFIX = "/.well-known/openid-configuration"
# Keywords whose values are data, not OpenAPI objects: a "$ref" inside is not a reference.
_DATA_KEYWORDS = ("example", "default", "enum", "const")


def _fail(path: str, message: str, status: int = 422) -> Problem:
    return Problem(status, f"{path}: {message}", errors=[{"field": path, "message": message}])


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_\-$]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


# Reading the document


class _Loader(DepthLimitedLoader):
    # Not the configuration's loader: OpenAPI documents have keys such as 200, and nest deeper.
    max_depth = MAX_DEPTH


def parse_document(body: bytes, media_type: str | None) -> dict[str, Any]:
    """The document as plain JSON data: YAML or JSON, UTF-8, bounded in size and depth."""
    if len(body) > MAX_BYTES:
        raise Problem(413, f"the document exceeds {MAX_BYTES} bytes")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = body.count(b"\n", 0, exc.start) + 1
        raise _fail(
            "body", f"not UTF-8 text: byte 0x{body[exc.start]:02x} on line {line}"
        ) from None
    if not text.strip():
        raise _fail("body", "the document is empty")
    # JSON's own parser for JSON: exact errors, and NaN refused; YAML reads the rest.
    as_json = media_type == "application/json" or (
        media_type != "application/yaml" and text.lstrip().startswith(("{", "["))
    )
    try:
        if as_json:
            data = json.loads(text, parse_constant=_not_a_number)
        else:
            loader = _Loader(text)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        raise _fail("body", message) from None
    except RecursionError:
        raise _fail("body", f"nested deeper than {MAX_DEPTH} levels") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise _fail("body", f"invalid YAML: {where}{problem}") from None
    except Exception as exc:
        # PyYAML's constructors trust their input: 2024-13-01 is a ValueError, and so on.
        raise _fail("body", f"invalid document: {' '.join(str(exc).split())[:300]}") from None
    if not isinstance(data, dict):
        raise _fail("body", "must be an OpenAPI object (a mapping at the top level)")
    return dict(_plain(data, "", 1, [MAX_NODES], set()))


def _not_a_number(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _plain(value: Any, path: str, depth: int, budget: list[int], ancestors: set[int]) -> Any:
    """A copy as JSON data; YAML aliases expanded within the limits, dates as ISO text."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _fail(path or "body", f"more than {MAX_NODES} values once aliases are expanded")
    if depth > MAX_DEPTH:
        raise _fail(path or "body", f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict | list):
        if id(value) in ancestors:
            raise _fail(path or "body", "a YAML alias refers to its own ancestor")
        ancestors.add(id(value))
        try:
            if isinstance(value, list):
                return [
                    _plain(v, _join(path, i), depth + 1, budget, ancestors)
                    for i, v in enumerate(value)
                ]
            out = {}
            for key, item in value.items():
                # YAML reads `200:` as a number; OpenAPI means the text.
                if isinstance(key, bool) or not isinstance(key, str | int):
                    raise _fail(path or "body", f"key {key!r} is not a string; quote it")
                out[str(key)] = _plain(item, _join(path, str(key)), depth + 1, budget, ancestors)
            return out
        finally:
            ancestors.discard(id(value))
    if isinstance(value, str):
        if "\x00" in value:
            raise _fail(path, "must not contain NUL characters")
        return value
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _fail(path, "must be a finite number")
        return value
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise _fail(path, f"a {type(value).__name__} value cannot be stored as JSON")


# Understanding it


@dataclass
class Operation:
    method: str
    path: str
    metric: str
    description: str


@dataclass
class Spec:
    title: str
    version: str
    operations: list[Operation]
    server: str | None  # the first server's URL, its variables at their defaults
    schemes: dict[str, dict[str, Any]]  # security schemes by name, references resolved
    requirements: list[str]  # scheme names, in the order the document requires them
    notes: list[str] = field(default_factory=list)


def _pointer(doc: dict[str, Any], ref: str) -> tuple[bool, Any]:
    """(found, value) of a local reference ``#/a/b``; JSON Pointer escapes honoured."""
    node: Any = doc
    fragment = unquote(ref[1:])
    if not fragment:
        return True, doc
    if not fragment.startswith("/"):
        return False, None
    for token in fragment.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


def _check_refs(doc: dict[str, Any], errors: FieldErrors) -> None:
    """Every local ``$ref`` points at something and no chain of references loops."""
    settled: set[str] = set()
    pending: list[tuple[Any, str]] = [(doc, "")]
    while pending:
        node, path = pending.pop()
        if isinstance(node, list):
            pending += [(item, _join(path, i)) for i, item in enumerate(node)]
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and ref not in settled:
            problem = _follow(doc, ref)
            if problem:
                errors.add(_join(path, "$ref"), problem)
            settled.add(ref)
        for key, item in node.items():
            if key not in _DATA_KEYWORDS and not key.startswith("x-"):
                pending.append((item, _join(path, key)))


def _follow(doc: dict[str, Any], ref: str) -> str | None:
    seen = [ref]
    while True:
        found, target = _pointer(doc, ref)
        if not found:
            return f"{ref!r} points at nothing in this document"
        following = target.get("$ref") if isinstance(target, dict) else None
        if not isinstance(following, str) or not following.startswith("#"):
            return None
        ref = following
        if ref in seen:
            return "the references loop: " + " → ".join([*seen, ref])
        seen.append(ref)


def _resolved(doc: dict[str, Any], value: Any, path: str) -> Any:
    """``value`` with its reference followed (they were checked); external ones refused."""
    while isinstance(value, dict) and isinstance(value.get("$ref"), str):
        ref = value["$ref"]
        if not ref.startswith("#"):
            raise _fail(
                _join(path, "$ref"), f"{ref!r}: only references within the document are followed"
            )
        _, value = _pointer(doc, ref)
    return value


def _metric_name(operation_id: str | None, method: str, path: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", operation_id or f"{method}{path}")
    name = name.strip("_.-")[:200].rstrip("_.-")
    return name or method


def read_spec(doc: dict[str, Any], reserved: Collection[str] = ("hits",)) -> Spec:
    """What a product takes from the document; every problem at its path as one 422."""
    if "swagger" in doc:
        raise _fail("swagger", "Swagger 2.0 documents are not supported: convert to OpenAPI 3")
    version = doc.get("openapi")
    if not isinstance(version, str) or not re.fullmatch(r"3\.\d+(\.\d+)?([-+.].*)?", version):
        message = "is required" if version is None else f"must be a 3.x version, not {version!r}"
        raise _fail("openapi", f"{message} (an OpenAPI 3.x document, e.g. openapi: 3.0.3)")
    errors = FieldErrors()
    info = doc.get("info")
    if not isinstance(info, dict):
        raise _fail("info", "must be a mapping with title and version")
    for key in ("title", "version"):
        if not isinstance(info.get(key), str):
            errors.add(f"info.{key}", "is required and must be a string")
    _check_refs(doc, errors)
    errors.raise_if_any()

    paths = doc.get("paths", {})
    if not isinstance(paths, dict):
        raise _fail("paths", "must be a mapping of paths to path items")
    operations: list[Operation] = []
    names = set(reserved)
    requirements: list[str] = []
    requirements += _requirements(doc.get("security"), "security", errors)
    for path, item in paths.items():
        where = _join("paths", path)
        if not path.startswith("/") or any(c in path for c in "?#$"):
            errors.add(where, "a path must start with / and hold no ?, # or $")
            continue
        item = _resolved(doc, item, where)
        if not isinstance(item, dict):
            errors.add(where, "must be a path item (a mapping)")
            continue
        for method in METHODS:
            if method not in item:
                continue
            here = _join(where, method)
            operation = _resolved(doc, item[method], here)
            if not isinstance(operation, dict):
                errors.add(here, "must be an operation (a mapping)")
                continue
            operation_id = operation.get("operationId")
            if operation_id is not None and not isinstance(operation_id, str):
                errors.add(_join(here, "operationId"), "must be a string")
                continue
            name = base = _metric_name(operation_id, method, path)
            suffix = 2
            while name in names:
                name, suffix = f"{base[:190]}_{suffix}", suffix + 1
            names.add(name)
            summary = operation.get("summary") or operation.get("description") or ""
            description = summary if isinstance(summary, str) else ""
            operations.append(Operation(method.upper(), path, name, description[:10_000]))
            requirements += _requirements(operation.get("security"), here + ".security", errors)
    server = _server(doc.get("servers"), errors)
    schemes = _schemes(doc, errors)
    errors.raise_if_any()
    notes = [] if operations else ["the document has no operations: every request is refused"]
    return Spec(
        title=info["title"],
        version=info["version"],
        operations=operations,
        server=server,
        schemes=schemes,
        requirements=list(dict.fromkeys(requirements)),
        notes=notes,
    )


def _requirements(value: Any, path: str, errors: FieldErrors) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        errors.add(path, "must be a list of security requirements (mappings)")
        return []
    return [name for requirement in value for name in requirement]


def _server(value: Any, errors: FieldErrors) -> str | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not isinstance(value[0], dict):
        errors.add("servers", "must be a list of server objects")
        return None
    url = value[0].get("url")
    if not isinstance(url, str):
        errors.add("servers[0].url", "is required and must be a string")
        return None
    variables = value[0].get("variables") or {}
    if not isinstance(variables, dict):
        errors.add("servers[0].variables", "must be a mapping")
        return None
    for name, variable in variables.items():
        default = variable.get("default") if isinstance(variable, dict) else None
        if not isinstance(default, str):
            errors.add(f"servers[0].variables.{name}.default", "is required and must be a string")
            continue
        url = url.replace("{" + name + "}", default)
    return url


def _schemes(doc: dict[str, Any], errors: FieldErrors) -> dict[str, dict[str, Any]]:
    components = doc.get("components", {})
    declared = components.get("securitySchemes", {}) if isinstance(components, dict) else {}
    if not isinstance(declared, dict):
        errors.add("components.securitySchemes", "must be a mapping")
        return {}
    schemes = {}
    for name, scheme in declared.items():
        where = _join("components.securitySchemes", name)
        scheme = _resolved(doc, scheme, where)
        if not isinstance(scheme, dict) or not isinstance(scheme.get("type"), str):
            errors.add(where, "must be a security scheme with a type")
            continue
        schemes[name] = scheme
    return schemes


# The product


@dataclass
class ImportOptions:
    product: str
    backend: str | None = None
    path_prefix: str | None = None
    jwks_url: str | None = None
    dry_run: bool = False


@dataclass
class ImportOutcome:
    outcome: Outcome
    product_id: int | None
    created: bool
    operations: int

    def to_json(self, name: str) -> dict[str, Any]:
        return {
            "product": {"id": self.product_id, "name": name},
            "created": self.created,
            "operations": self.operations,
            **self.outcome.to_json(),
        }


def _auth(spec: Spec, current: dict[str, Any] | None, options: ImportOptions) -> dict[str, Any]:
    """The product's auth from the first security scheme a gateway can enforce."""
    existing = current["auth"] if current is not None else None
    names = [*spec.requirements, *spec.schemes]
    for name in dict.fromkeys(names):
        scheme = spec.schemes.get(name)
        if scheme is None:
            continue
        where = _join("components.securitySchemes", name)
        kind, located = scheme["type"], scheme.get("in")
        if (
            kind == "apiKey"
            and located in ("header", "query")
            and isinstance(scheme.get("name"), str)
        ):
            others = [n for n in spec.requirements if n != name]
            if others:
                spec.notes.append(
                    f"operations also accept {', '.join(others)}: a product has "
                    f"one auth mode, {name!r} is the one used"
                )
            return {"type": "api_key", located: scheme["name"]}
        bearer = kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"
        if kind in ("oauth2", "openIdConnect") or bearer:
            return _jwt(name, where, scheme, existing, options, spec)
        spec.notes.append(f"security scheme {name!r} ({kind}) cannot be enforced by a gateway")
    if existing is not None:
        return dict(existing)
    spec.notes.append(
        "the document requires no security scheme a gateway can enforce: the product uses "
        "api_key (header X-API-Key or query user_key); change auth to open it"
    )
    return {"type": "api_key"}


def _jwt(
    name: str,
    where: str,
    scheme: dict[str, Any],
    existing: dict[str, Any] | None,
    options: ImportOptions,
    spec: Spec,
) -> dict[str, Any]:
    auth: dict[str, Any] = {"type": "jwt"}
    if existing is not None and existing.get("type") == "jwt":
        auth = dict(existing)
    discovery = scheme.get("openIdConnectUrl")
    if isinstance(discovery, str) and discovery.endswith(OIDC_SUFFIX):
        # OpenID Connect Discovery: the configuration is at the issuer + this suffix.
        auth["issuer"] = discovery.removesuffix(OIDC_SUFFIX)
    elif "issuer" not in auth:
        spec.notes.append(
            f"{where}: the token issuer is not derivable from the document: set "
            "auth.issuer on the product to check the iss claim"
        )
    if options.jwks_url is not None:
        auth["jwks_url"] = options.jwks_url
        auth.pop("keys", None)
    if not auth.get("jwks_url") and not auth.get("keys"):
        hint = f" (the jwks_uri in {discovery})" if isinstance(discovery, str) else ""
        raise _fail(
            where,
            f"{scheme['type']} means JWTs, and a gateway checks their signatures with keys or "
            f"a jwks_url, which an OpenAPI document does not give: pass jwks_url{hint}",
        )
    return auth


def _product(spec: Spec, current: dict[str, Any] | None, options: ImportOptions) -> dict[str, Any]:
    """The product the document describes, over what the control plane already has."""
    name = options.product
    doc: dict[str, Any] = (
        dict(current)
        if current is not None
        else {
            "name": name,
            "hosts": ["*"],
            # Unique as product names are: imported products never collide at the edge.
            "path_prefix": f"/{name}",
            "strip_prefix": True,
            "plans": [],
            "policies": [],
        }
    )
    if options.path_prefix is not None:
        doc["path_prefix"] = options.path_prefix
    backends = {b["path"]: b["url"] for b in doc.pop("backends", [])}
    if "backend" in doc:
        backends["/"] = doc.pop("backend")
    url = options.backend
    if url is None and spec.server is not None:
        try:
            url = check_backend_url(spec.server.rstrip("/") or spec.server)
        except ValueError:
            if not backends:
                raise _fail(
                    "servers[0].url",
                    f"{spec.server!r} is not an http:// or https:// URL a gateway can proxy "
                    "to: pass "
                    "backend=http://HOST:PORT[/PATH]",
                ) from None
            spec.notes.append(
                f"servers[0].url {spec.server!r} is not an http:// or https:// URL: the "
                "product's backends are kept"
            )
    if url is not None:
        backends["/"] = url
    if not backends:
        raise _fail("servers", "the document names no server: pass backend=http://HOST:PORT")
    doc["backends"] = [{"path": p, "url": u} for p, u in sorted(backends.items())]
    doc["auth"] = _auth(spec, current, options)

    # The document owns the methods of hits; other metrics stay with their limits.
    kept = [m for m in doc.get("metrics", [{"name": "hits"}]) if m.get("parent") != "hits"]
    methods = [
        {
            "name": op.metric,
            "parent": "hits",
            **({"description": op.description} if op.description else {}),
        }
        for op in spec.operations
    ]
    doc["metrics"] = kept + methods
    known = {m["name"] for m in doc["metrics"]}
    # Concrete paths first: /pets/mine is not /pets/{id}; each rule is last.
    ordered = sorted(spec.operations, key=lambda op: op.path.count("{"))
    doc["mapping_rules"] = [
        {"method": op.method, "pattern": op.path + "$", "metric": op.metric, "last": True}
        for op in ordered
    ]
    doc["plans"] = [
        {**plan, "limits": [lim for lim in plan["limits"] if lim["metric"] in known]}
        for plan in doc["plans"]
    ]
    return doc


def import_openapi(
    session: Session,
    actor: Actor,
    document: dict[str, Any],
    options: ImportOptions,
    stage: Any = None,
) -> ImportOutcome:
    """Create or update the product ``options.product`` from ``document``, in the caller's
    transaction (nothing is written when ``options.dry_run``)."""
    current = next(iter(export_document(session, False, [options.product])["products"]), None)
    reserved = {"hits"} | {
        m["name"] for m in (current or {}).get("metrics", []) if m.get("parent") != "hits"
    }
    spec = read_spec(document, reserved)
    product = _product(spec, current, options)
    try:
        config = Config.model_validate({"products": [product]})
    except ValidationError as exc:
        errors = FieldErrors()
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"][2:]) or "body"
            errors.add(where, str(error["msg"]).removeprefix("Value error, "))
        errors.raise_if_any()
        raise
    sync = Options(prune=False, applications=False)
    outcome = synchronise(session, actor, config, sync, options.dry_run, stage)
    outcome.notes += spec.notes
    row = session.scalar(select(Product).where(Product.name == options.product))
    if row is not None and not options.dry_run and row.openapi != document:
        before = _describe(row.openapi)
        row.openapi = document
        if current is None and not row.description:
            row.description = spec.title
        session.flush()
        audit(session, actor, "import_openapi", "product", row.id, before, _describe(document))
    return ImportOutcome(outcome, row.id if row else None, current is None, len(spec.operations))


def _describe(document: dict[str, Any] | None) -> dict[str, Any] | None:
    if document is None:
        return None
    info = document.get("info", {})
    return {"openapi": {"title": info.get("title"), "version": info.get("version")}}


def check_backend(value: str) -> str:
    try:
        return check_backend_url(value)
    except ValueError as exc:
        raise _fail("query.backend", str(exc)) from None


def check_prefix(value: str) -> str:
    try:
        return check_path_prefix(value)
    except ValueError as exc:
        raise _fail("query.path_prefix", str(exc)) from None
