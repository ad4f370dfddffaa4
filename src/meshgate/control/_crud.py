"""Create, read, update, delete and list for one resource of the admin API.

Every change is one transaction: the row, its audit entry and, for a product's gateway
configuration, its staging document commit together or not at all. Reads answer with an
``ETag`` (the row's version); a change sent with ``If-Match`` that no longer holds is 412.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint signatures built here.

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meshgate.control._auth import Actor, require
from meshgate.control._problems import Problem
from meshgate.control.models import AuditEntry, Base
from meshgate.control.schemas import MAX_ID, NO_NUL, Page

__all__ = ["Change", "Parent", "Resource", "audit", "check_if_match", "etag", "get_or_404"]

ItemId = Path(ge=1, le=MAX_ID, description="The resource's id.")
Scope = Literal["config", "live", "none"]


@dataclass
class Change:
    """What a hook needs: the open transaction, who acts, and the control plane."""

    session: Session
    actor: Actor
    request: Request

    @property
    def plane(self) -> Any:
        return self.request.app.state.plane


@dataclass(frozen=True)
class Parent:
    path: str  # "products"
    key: str  # "product_id"
    model: type[Base]


@dataclass
class Resource:
    path: str
    model: type[Base]
    out: type[BaseModel]
    create: type[BaseModel] | None = None
    update: type[BaseModel] | None = None
    parent: Parent | None = None
    filters: dict[str, type] = field(default_factory=dict)
    scope: Scope = "none"
    tag: str = ""
    # Validates and derives fields before the row is written; raises Problem to refuse.
    prepare: Callable[[Change, Any, dict[str, Any], bool], None] | None = None
    # Runs after the row is flushed (it has its id) on create.
    created: Callable[[Change, Any], None] | None = None
    # Refuses a delete (raises Problem), e.g. the hits metric.
    deleting: Callable[[Change, Any], None] | None = None
    # The product whose configuration or data a row belongs to.
    product_of: Callable[[Session, Any], int | None] = lambda _s, row: row.product_id
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.path.rstrip("s")
        self.tag = self.tag or self.path

    @property
    def label(self) -> str:
        """The name as a reader says it: "mapping rule"."""
        return self.name.replace("_", " ")

    @property
    def a_label(self) -> str:
        return ("an " if self.label[0] in "aeiou" else "a ") + self.label


def etag(row: Any) -> str:
    return f'"{row.version}"'


def check_if_match(row: Any, if_match: str | None) -> None:
    if if_match is None:
        return
    wanted = [t.strip() for t in if_match.split(",")]
    if "*" in wanted:
        return
    current = etag(row)
    # Strong comparison (RFC 9110 13.1.1): a weak tag never matches.
    if current not in wanted:
        raise Problem(
            412,
            f"If-Match {if_match} does not hold: the resource is now at ETag {current}",
            etag=current,
        )


def get_or_404(session: Session, model: type[Base], id_: int, what: str) -> Any:
    row = session.get(model, id_)
    if row is None:
        raise Problem(404, f"{what} {id_} does not exist")
    return row


def audit(
    session: Session,
    actor: Actor,
    action: str,
    resource: str,
    resource_id: Any,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    session.add(
        AuditEntry(
            actor=actor.name,
            action=action,
            resource=resource,
            resource_id=None if resource_id is None else str(resource_id),
            before=before,
            after=after,
        )
    )


def _dump(out: type[BaseModel], row: Any) -> dict[str, Any]:
    return out.model_validate(row).model_dump(mode="json")


def _finish(change: Change, res: Resource, row: Any) -> None:
    """Inside the transaction: restage the product's configuration when it changed."""
    if res.scope == "config":
        product_id = res.product_of(change.session, row)
        if product_id is not None:
            change.plane.stage(change.session, product_id)


def _after_commit(change: Change, res: Resource) -> None:
    if res.scope != "none":
        change.plane.changed(res.scope)


def routes(router: APIRouter, res: Resource) -> None:
    """Add the resource's endpoints to ``router``."""
    model, out = res.model, res.out
    collection = f"/{res.path}"
    if res.parent is not None:
        collection = f"/{res.parent.path}/{{{res.parent.key}}}/{res.path}"
    item = f"/{res.path}/{{item_id}}"
    reader, writer = require("read"), require("write")

    def session_for(request: Request, write: bool) -> Session:
        db = request.app.state.plane.db
        return db.writer() if write else db.session()

    def list_rows(
        request: Request,
        response: Response,
        parent_id: int | None,
        page: int,
        per_page: int,
        filters: dict[str, Any],
    ) -> dict[str, Any]:
        with session_for(request, False) as session:
            query = select(model)
            if res.parent is not None:
                get_or_404(session, res.parent.model, parent_id or 0, res.parent.path.rstrip("s"))
                query = query.where(getattr(model, res.parent.key) == parent_id)
            for name, value in filters.items():
                if value is not None:
                    query = query.where(getattr(model, name) == value)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(
                query.order_by(model.id).offset((page - 1) * per_page).limit(per_page)  # type: ignore[attr-defined]
            ).all()
            items = [out.model_validate(r) for r in rows]
        return {"items": items, "page": page, "per_page": per_page, "total": total}

    filter_params = list(res.filters.items())

    # The signature FastAPI reads: parent id in the path, filters in the query.
    params = _collection_params(res) + [
        _param("page", int, Query(1, ge=1, le=1_000_000)),
        _param("per_page", int, Query(50, ge=1, le=500)),
        _param("_actor", Actor, Depends(reader)),
    ]
    for name, tp in filter_params:
        default = (
            Query(None, ge=1, le=MAX_ID)
            if tp is int
            else Query(None, max_length=200, pattern=NO_NUL)
        )
        params.append(_param(name, tp | None, default))

    def list_impl(**kwargs: Any) -> dict[str, Any]:
        filters = {name: kwargs[name] for name, _ in filter_params}
        return list_rows(
            kwargs["request"],
            kwargs["response"],
            kwargs.get(res.parent.key) if res.parent is not None else None,
            kwargs["page"],
            kwargs["per_page"],
            filters,
        )

    list_impl.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    router.add_api_route(
        collection,
        list_impl,
        methods=["GET"],
        response_model=Page[out],  # type: ignore[valid-type]
        summary=f"List {res.path}",
        tags=[res.tag],
        operation_id=f"list_{res.path}",
    )

    def get_item(
        request: Request,
        response: Response,
        item_id: int = ItemId,
        _actor: Actor = Depends(reader),
    ) -> Any:
        with session_for(request, False) as session:
            row = get_or_404(session, model, item_id, res.label)
            response.headers["ETag"] = etag(row)
            return out.model_validate(row)

    router.add_api_route(
        item,
        get_item,
        methods=["GET"],
        response_model=out,
        summary=f"Read {res.a_label}",
        tags=[res.tag],
        operation_id=f"read_{res.name}",
        responses={404: {"description": "No such resource"}},
    )

    if res.create is not None:
        create_model = res.create

        def create_impl(**kwargs: Any) -> Any:
            request: Request = kwargs["request"]
            response: Response = kwargs["response"]
            actor: Actor = kwargs["actor"]
            body: BaseModel = kwargs["body"]
            data = body.model_dump(exclude_unset=False)
            with session_for(request, True) as session, session.begin():
                change = Change(session, actor, request)
                if res.parent is not None:
                    parent_id = kwargs[res.parent.key]
                    get_or_404(session, res.parent.model, parent_id, res.parent.path.rstrip("s"))
                    data[res.parent.key] = parent_id
                row: Any = model()
                if res.prepare is not None:
                    res.prepare(change, row, data, True)
                for key, value in data.items():
                    if hasattr(model, key):
                        setattr(row, key, value)
                session.add(row)
                session.flush()
                if res.created is not None:
                    res.created(change, row)
                _finish(change, res, row)
                session.flush()
                after = _dump(out, row)
                audit(session, actor, "create", res.name, row.id, None, after)
                result = out.model_validate(row)
            _after_commit(change, res)
            response.status_code = 201
            response.headers["ETag"] = etag(row)
            response.headers["Location"] = f"/admin/api/{res.path}/{row.id}"
            return result

        params = _collection_params(res) + [
            _param("body", create_model),
            _param("actor", Actor, Depends(writer)),
        ]
        create_impl.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        router.add_api_route(
            collection,
            create_impl,
            methods=["POST"],
            status_code=201,
            response_model=out,
            summary=f"Create {res.a_label}",
            tags=[res.tag],
            operation_id=f"create_{res.name}",
        )

    if res.update is not None:
        update_model = res.update

        def update_impl(**kwargs: Any) -> Any:
            request: Request = kwargs["request"]
            response: Response = kwargs["response"]
            actor: Actor = kwargs["actor"]
            body: BaseModel = kwargs["body"]
            data = body.model_dump(exclude_unset=True)
            with session_for(request, True) as session, session.begin():
                change = Change(session, actor, request)
                row = get_or_404(session, model, kwargs["item_id"], res.label)
                check_if_match(row, kwargs["if_match"])
                before = _dump(out, row)
                for key, value in list(data.items()):
                    # null for a field that cannot be null means "leave as is".
                    if value is None and not _nullable(model, key):
                        del data[key]
                if res.prepare is not None:
                    res.prepare(change, row, data, False)
                for key, value in data.items():
                    if hasattr(model, key):
                        setattr(row, key, value)
                session.flush()
                _finish(change, res, row)
                session.flush()
                after = _dump(out, row)
                if after != before:
                    audit(session, actor, "update", res.name, row.id, before, after)
                result = out.model_validate(row)
            _after_commit(change, res)
            response.headers["ETag"] = etag(row)
            return result

        update_impl.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                _param("request", Request),
                _param("response", Response),
                _param("item_id", int, ItemId),
                _param("body", update_model),
                _param(
                    "if_match",
                    str | None,
                    Header(
                        None,
                        max_length=1000,
                        description="ETag from a read: 412 when the resource changed since.",
                    ),
                ),
                _param("actor", Actor, Depends(writer)),
            ]
        )
        router.add_api_route(
            item,
            update_impl,
            methods=["PATCH"],
            response_model=out,
            summary=f"Update {res.a_label}",
            tags=[res.tag],
            operation_id=f"update_{res.name}",
            responses={412: {"description": "If-Match does not hold"}},
        )

    def delete_item(
        request: Request,
        item_id: int = ItemId,
        if_match: str | None = Header(None, max_length=1000),
        actor: Actor = Depends(writer),
    ) -> Response:
        with session_for(request, True) as session, session.begin():
            change = Change(session, actor, request)
            row = get_or_404(session, model, item_id, res.label)
            check_if_match(row, if_match)
            if res.deleting is not None:
                res.deleting(change, row)
            before = _dump(out, row)
            product_id = res.product_of(session, row) if res.scope == "config" else None
            session.delete(row)
            session.flush()
            deleting_product = res.model.__tablename__ == "products"
            if product_id is not None and not deleting_product:
                change.plane.stage(session, product_id)
            audit(session, actor, "delete", res.name, item_id, before, None)
        if deleting_product:
            # Its configuration left every environment with it (the rows cascade).
            change.plane.changed("live")
        else:
            _after_commit(change, res)
        return Response(status_code=204)

    router.add_api_route(
        item,
        delete_item,
        methods=["DELETE"],
        status_code=204,
        summary=f"Delete {res.a_label}",
        tags=[res.tag],
        operation_id=f"delete_{res.name}",
        responses={412: {"description": "If-Match does not hold"}},
    )


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> Any:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


def _collection_params(res: Resource) -> list[Any]:
    """request, response, and the parent's id in the path of a nested collection."""
    params = [_param("request", Request), _param("response", Response)]
    if res.parent is not None:
        params.append(_param(res.parent.key, int, Path(ge=1, le=MAX_ID)))
    return params


def _nullable(model: type[Base], key: str) -> bool:
    column = model.__table__.columns.get(key)  # type: ignore[attr-defined]
    return column is not None and bool(column.nullable)
