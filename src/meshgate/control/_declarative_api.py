"""The admin API of declarative management and OpenAPI import.

``GET /declarative`` exports the model in the gateway file format; ``POST /declarative``
applies a file (``dry_run`` only shows the difference); ``POST /imports/openapi`` creates or
updates a product from an OpenAPI document, served back at ``GET /products/{id}/openapi``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import yaml
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from meshgate.config import ConfigError
from meshgate.config.loader import MAX_BYTES, parse_declarative
from meshgate.control import schemas as s
from meshgate.control._auth import Reader, Writer
from meshgate.control._crud import get_or_404
from meshgate.control._problems import Problem
from meshgate.control.declarative import Options, export_document, synchronise
from meshgate.control.models import Product
from meshgate.control.openapi_import import (
    ImportOptions,
    check_backend,
    check_prefix,
    import_openapi,
    parse_document,
)

__all__ = ["router"]

router = APIRouter()

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
ACCEPTED_TYPES = ("application/json", "text/plain", *YAML_TYPES)

_FILE_BODY = {
    "requestBody": {
        "required": True,
        "description": "YAML or JSON.",
        "content": {
            "application/yaml": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}


def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    if value is None:
        return None
    media = value.split(";")[0].strip().lower()
    if media not in ACCEPTED_TYPES:
        raise Problem(415, f"send YAML or JSON ({', '.join(ACCEPTED_TYPES)}), not {media}")
    return "application/yaml" if media in YAML_TYPES else media


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_BYTES:
        raise Problem(413, f"the document exceeds {MAX_BYTES} bytes")
    return body


@contextmanager
def _transaction(plane: Any, write: bool) -> Iterator[Session]:
    """One transaction with one consistent view of the model across its queries: PostgreSQL's
    default isolation shows each query the latest commits, so an application could refer to
    a plan the earlier query did not see (SQLite's transactions are snapshots already). A
    concurrent change that then conflicts is refused, and the client tries again."""
    with plane.db.writer() if write else plane.db.session() as session, session.begin():
        if not plane.db.is_sqlite:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


@router.get(
    "/declarative",
    tags=["declarative"],
    operation_id="export_declarative",
    summary="The products, plans and applications in the gateway file format (keys as "
    "hashes), and the mesh's staging services in a mesh section",
    responses={200: {"content": {"application/json": {}, "application/yaml": {}}}},
)
def export(
    request: Request,
    _actor: Reader,
    format: Literal["json", "yaml"] | None = Query(
        None, description="The default follows Accept: YAML when it names YAML, else JSON."
    ),
    applications: bool = Query(True, description="false: leave applications out."),
) -> Response:
    with _transaction(request.app.state.plane, write=False) as session:
        document = export_document(session, applications)
    accept = request.headers.get("accept", "")
    if format == "yaml" or (format is None and "yaml" in accept):
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
        return Response(text, media_type="application/yaml")
    return Response(json.dumps(document, ensure_ascii=False), media_type="application/json")


@router.post(
    "/declarative",
    tags=["declarative"],
    operation_id="apply_declarative",
    summary="Apply a gateway configuration file: the difference, made in one transaction",
    description="Products the file does not name are removed unless prune=false; within a "
    "product the file names, the file is the whole product (applications too, unless "
    "applications=false). A mesh section ({services: [...]}) is staging's mesh services, "
    "synchronised the same way; without one the mesh is left alone.",
    openapi_extra=_FILE_BODY,
)
async def apply(
    request: Request,
    actor: Writer,
    dry_run: bool = Query(False, description="Only compute the difference."),
    prune: bool = Query(True, description="Remove the products the file does not name."),
    applications: bool = Query(True, description="false: leave applications and keys alone."),
) -> Any:
    _media_type(request)
    body = await _body(request)
    try:
        config, mesh = parse_declarative(body, "body")
    except ConfigError as exc:
        errors = []
        for line in exc.errors:
            path, _, message = line.partition(": ")
            errors.append(
                {"field": path, "message": message}
                if message
                else {"field": "body", "message": line}
            )
        detail = "; ".join(exc.errors[:5])
        raise Problem(422, f"invalid configuration: {detail}", errors=errors) from None
    plane = request.app.state.plane
    options = Options(prune=prune, applications=applications)

    def run() -> dict[str, Any]:
        with _transaction(plane, write=not dry_run) as session:
            outcome = synchronise(session, actor, config, options, dry_run, plane.stage, mesh=mesh)
        plane.mesh_published(outcome.mesh_snapshot)
        if outcome.applied and outcome.changes:
            if outcome.config_changed:
                plane.changed("config")
            if outcome.live_changed:
                plane.changed("live")
        return {"dry_run": dry_run, **outcome.to_json()}

    return await run_in_threadpool(run)


@router.post(
    "/imports/openapi",
    tags=["products"],
    operation_id="import_openapi",
    responses={201: {"description": "The product was created."}},
    summary="Create or update a product from an OpenAPI 3.x document",
    description="One method under hits per operation, exact mapping rules from the paths, "
    "the auth mode from the security schemes, the backend from the first server; the "
    "document is stored for the developer portal.",
    openapi_extra=_FILE_BODY,
)
async def import_document(
    request: Request,
    actor: Writer,
    response: Response,
    product: str = Query(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="The product to create or update.",
    ),
    backend: str | None = Query(
        None, max_length=2000, description="Backend URL, when the first server is not http://."
    ),
    path_prefix: str | None = Query(
        None, max_length=1000, description="Where the product is at the gateway (default /NAME)."
    ),
    jwks_url: str | None = Query(
        None,
        max_length=2000,
        pattern=r"^https?://[^\s]+$",
        description="For oauth2 and openIdConnect: where gateways get the signing keys.",
    ),
    dry_run: bool = Query(False, description="Only compute the difference."),
) -> Any:
    media = _media_type(request)
    document = parse_document(await _body(request), media)
    options = ImportOptions(
        product=product,
        backend=None if backend is None else check_backend(backend),
        path_prefix=None if path_prefix is None else check_prefix(path_prefix),
        jwks_url=jwks_url,
        dry_run=dry_run,
    )
    plane = request.app.state.plane

    def run() -> dict[str, Any]:
        with _transaction(plane, write=not dry_run) as session:
            result = import_openapi(session, actor, document, options, plane.stage)
        outcome = result.outcome
        if outcome.applied and outcome.changes:
            plane.changed("config")
            if outcome.live_changed:
                plane.changed("live")
        response.status_code = 201 if result.created and not dry_run else 200
        return {"dry_run": dry_run, **result.to_json(product)}

    return await run_in_threadpool(run)


@router.get(
    "/products/{item_id}/openapi",
    tags=["products"],
    operation_id="read_product_openapi",
    summary="The product's OpenAPI document, as imported",
    responses={200: {"content": {"application/json": {}}}, 404: {}},
)
def read_openapi(
    request: Request, _actor: Reader, item_id: int = Path(ge=1, le=s.MAX_ID)
) -> Response:
    with request.app.state.plane.db.session() as session:
        product = get_or_404(session, Product, item_id, "product")
        if product.openapi is None:
            raise Problem(
                404,
                f"product {item_id} has no OpenAPI document: import one with "
                f"POST /admin/api/imports/openapi?product={product.name}",
            )
        body = json.dumps(product.openapi, ensure_ascii=False)
    return Response(body, media_type="application/json")
