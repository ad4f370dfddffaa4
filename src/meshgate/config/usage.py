"""Usage batches: what a gateway reports to the control plane (``POST /dp/v1/usage``).

A batch holds sums per minute: metric usage per application, responses per application,
status and reason, and latency histograms per product. Sums add up, so a batch may carry
part of a minute and the next batch the rest; a batch is counted once by its ``id``, however
often it is sent (a gateway resends until the control plane acknowledges it).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from meshgate.config._fields import _NAME, _Strict

__all__ = [
    "LATENCY_BOUNDS_MS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ROWS",
    "REASONS",
    "LatencyRow",
    "Reason",
    "ResponseRow",
    "UsageBatch",
    "UsageRow",
    "latency_bucket",
    "reason_of",
]

# Upper bounds (milliseconds, inclusive) of the latency histogram's buckets; one more bucket
# holds everything slower. Prometheus's and Envoy's default boundaries, thinned.
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# Why a response is what it is: forwarded to the backend (whatever it answered), or refused
# by the gateway, and on what ground.
REASONS = (
    "ok",  # forwarded upstream; the status is the backend's (or 502/504 from the gateway)
    "unauthenticated",  # 401: no or a wrong credential
    "forbidden",  # 403: a suspended application, an upgrade refused, a policy
    "limited",  # 429: a usage limit
    "not_found",  # 404: no product, mapping rule or backend serves the request
    "unavailable",  # 503: the counters could not be reached and the gateway fails closed
    "invalid",  # 4xx the gateway answered for a malformed or oversized request
)
Reason = Literal[
    "ok", "unauthenticated", "forbidden", "limited", "not_found", "unavailable", "invalid"
]

MAX_BATCH_ROWS = 200_000
MAX_BATCH_BYTES = 32 * 2**20
# 2020-01-01 .. 2100-01-01: a minute outside is a clock gone wrong, not usage.
_MIN_MINUTE = 1_577_836_800
_MAX_MINUTE = 4_102_444_800

ProductName = Annotated[str, Field(max_length=200, pattern=r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)?$")]
# No NUL: PostgreSQL refuses it in text, SQLite would store it; refused alike here.
ApplicationId = Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")]
MetricName = Annotated[str, Field(min_length=1, max_length=200, pattern=_NAME)]
Minute = Annotated[int, Field(ge=_MIN_MINUTE, le=_MAX_MINUTE, multiple_of=60)]
Count = Annotated[int, Field(ge=1, le=10**15)]
Status = Annotated[int, Field(ge=100, le=599)]

# [product, application, metric, minute (epoch seconds, a multiple of 60), value]
UsageRow = tuple[ProductName, ApplicationId, MetricName, Minute, Count]
# A response count may be negative: a gateway that counted a response as a presumed 200 with
# its usage corrects it when the answer was another (-1 on the 200, +1 on the answer), and
# the correction may come in a later batch than the presumption.
ResponseCount = Annotated[int, Field(ge=-(10**15), le=10**15)]
# [product ("" when none matched), application ("" when none was identified), status,
#  reason, minute, count]
ResponseRow = tuple[ProductName, ApplicationId, Status, Reason, Minute, ResponseCount]
# [product, minute, counts per bucket of LATENCY_BOUNDS_MS and one above, milliseconds summed]
LatencyRow = tuple[
    ProductName,
    Minute,
    Annotated[
        list[Annotated[int, Field(ge=0, le=10**15)]],
        Field(min_length=len(LATENCY_BOUNDS_MS) + 1, max_length=len(LATENCY_BOUNDS_MS) + 1),
    ],
    Annotated[float, Field(ge=0, le=1e18)],
]


class UsageBatch(_Strict):
    """One report of a gateway's usage since its last; see the module's note."""

    # Numbers as numbers: a gateway sends JSON it made, so "5" or true is a fault, not a 5.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    id: str = Field(
        pattern=r"^[A-Za-z0-9._:\-]{8,128}$",
        description="Unique per batch (the gateway's id and a sequence, or a UUID): a batch "
        "sent again with the same id is acknowledged and not counted again.",
    )
    usage: list[UsageRow] = Field(default_factory=list)
    responses: list[ResponseRow] = Field(default_factory=list)
    latency: list[LatencyRow] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounded(self) -> UsageBatch:
        rows = len(self.usage) + len(self.responses) + len(self.latency)
        if rows > MAX_BATCH_ROWS:
            raise ValueError(f"a batch holds at most {MAX_BATCH_ROWS} rows, this one {rows}")
        return self


def latency_bucket(milliseconds: float) -> int:
    """The index of the histogram bucket that counts a response of ``milliseconds``."""
    for index, bound in enumerate(LATENCY_BOUNDS_MS):
        if milliseconds <= bound:
            return index
    return len(LATENCY_BOUNDS_MS)


def reason_of(status: int, forwarded: bool) -> Reason:
    """The reason of a response the gateway forwarded, or of one it answered itself."""
    if forwarded:
        return "ok"
    if status == 401:
        return "unauthenticated"
    if status == 403:
        return "forbidden"
    if status == 429:
        return "limited"
    if status == 404:
        return "not_found"
    if status == 503:
        return "unavailable"
    return "invalid"
