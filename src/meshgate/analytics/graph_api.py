"""The service graph's API: sidecars report edges, operators read the graph."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from meshgate.analytics import graph as _graph
from meshgate.config.edges import EdgeReport
from meshgate.control._auth import DataplaneActor, Reader
from meshgate.control._problems import Problem
from meshgate.control.schemas import Env

__all__ = ["admin", "dataplane"]

admin = APIRouter(prefix="/mesh", tags=["mesh"])
dataplane = APIRouter(prefix="/dp/v1/mesh", tags=["mesh data plane"])

# A report of 10,000 edges is well under this.
MAX_REPORT_BYTES = 8 * 2**20


@dataplane.post(
    "/edges",
    status_code=202,
    operation_id="report_mesh_edges",
    summary="A sidecar's calls since its last report, as edges of the service graph "
    "(meshgate.config.edges.EdgeReport)",
    responses={413: {}, 422: {}},
)
async def report_edges(request: Request, actor: DataplaneActor) -> Any:
    body = await request.body()
    if len(body) > MAX_REPORT_BYTES:
        raise Problem(413, f"an edge report is at most {MAX_REPORT_BYTES} bytes")
    try:
        report = EdgeReport.model_validate_json(body)
    except ValidationError as exc:
        malformed = any(e["type"] == "json_invalid" for e in exc.errors())
        raise Problem(
            400 if malformed else 422,
            f"the edge report is invalid: {exc.error_count()} error(s)",
            errors=[
                {"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)[:20]
            ],
        ) from None
    db = request.app.state.plane.db
    stored = await run_in_threadpool(_graph.store, db, report, actor.name)
    return {"accepted": stored}


@admin.get(
    "/graph",
    operation_id="mesh_graph",
    summary="The service graph over the last `window` seconds: services, the gateway and "
    "callers outside the mesh as nodes; calls as edges with counts, error rate, latency "
    "percentiles and how many rode mutual TLS",
)
async def read_graph(
    request: Request,
    _actor: Reader,
    env: Env = Query("production"),
    window: Annotated[int, Query(ge=10, le=_graph.KEEP_SECONDS)] = 300,
) -> Any:
    plane = request.app.state.plane
    instances = plane.registry.instances(env)
    return await run_in_threadpool(_graph.graph, plane.db, env, window, instances)
