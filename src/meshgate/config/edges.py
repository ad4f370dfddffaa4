"""Edge reports: what sidecars send the control plane for the service graph
(``POST /dp/v1/mesh/edges``).

An edge is the calls from one workload to one service in an interval: how many, how many
failed (5xx), how many rode mutual TLS, and their durations as a histogram on Istio's
default bounds (the sidecar's ``istio_request_duration_milliseconds``), so that the control
plane can add edges from many sidecars and read percentiles of the sum.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from meshgate.config._fields import _Strict

__all__ = ["DURATION_BOUNDS_MS", "MAX_EDGES", "EdgeReport", "EdgeRow", "UNKNOWN"]

# Istio's default request duration buckets (ms); the last one holds everything slower.
DURATION_BOUNDS_MS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
    float("inf"),
)
# A caller that is not a workload of the mesh (no sidecar, no identity).
UNKNOWN = "unknown"
MAX_EDGES = 10_000
_COUNT = 2**48
# A workload's or a service's name (or "unknown"); versions are not part of an edge.
Workload = Annotated[
    str,
    Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*$",
    ),
]
Count = Annotated[int, Field(ge=0, le=_COUNT)]


class EdgeRow(_Strict):
    source: Workload
    destination: Workload
    requests: Count
    errors: Count = 0
    mtls: Count = Field(0, description="Of the requests, those over mutual TLS.")
    durations: list[Count] = Field(
        description="Requests per duration bucket (DURATION_BOUNDS_MS), as many as bounds."
    )

    @model_validator(mode="after")
    def _sums(self) -> EdgeRow:
        if len(self.durations) != len(DURATION_BOUNDS_MS):
            raise ValueError(f"durations: give {len(DURATION_BOUNDS_MS)} bucket counts")
        if sum(self.durations) != self.requests:
            raise ValueError("durations: the bucket counts must add up to requests")
        if self.errors > self.requests or self.mtls > self.requests:
            raise ValueError("errors and mtls are parts of requests: at most requests")
        return self


class EdgeReport(_Strict):
    env: Literal["staging", "production"]
    edges: list[EdgeRow] = Field(max_length=MAX_EDGES)
