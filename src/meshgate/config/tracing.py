"""Tracing settings shared by the gateway, the sidecar and the integration runtime.

Traces follow W3C Trace Context (``traceparent``/``tracestate``) and are exported over
OTLP/HTTP. Unset fields fall back to the standard OpenTelemetry environment variables
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, ValidationError, field_validator

from meshgate.config._fields import _Strict

__all__ = ["TracingSettings", "with_flags"]

_HTTP_URL = re.compile(r"^https?://[\x21-\x7e]+$")


class TracingSettings(_Strict):
    """Whether and where this process exports spans, and which share of new traces it keeps."""

    enabled: bool = Field(
        False,
        description="Start or continue a trace per request and export the sampled ones. Off, "
        "trace headers pass through untouched and nothing is built.",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (http://collector:4318; /v1/traces is "
        "appended unless given); OTEL_EXPORTER_OTLP_ENDPOINT when absent.",
    )
    sample_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of new traces sampled (ParentBased(TraceIdRatio): a caller's "
        "decision is kept); OTEL_TRACES_SAMPLER_ARG when absent, else 1.",
    )
    trust_incoming: bool = Field(
        True,
        description="Continue the trace of a request's traceparent, its sampled flag "
        "included; false starts a new trace for every request (an edge that does not let "
        "clients choose what is sampled).",
    )
    service_name: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="service.name of the spans; the role's own name when absent.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and _HTTP_URL.fullmatch(value) is None:
            raise ValueError("must be an http:// or https:// URL without spaces")
        return value


def with_flags(settings: TracingSettings | None, flags: dict[str, Any]) -> TracingSettings:
    """``settings`` (a file's section) with settings given as flags over it, checked; a
    ValueError names each problem on one line (``tracing.endpoint: ...``)."""
    given = settings.model_dump(exclude_unset=True) if settings is not None else {}
    try:
        return TracingSettings.model_validate({**given, **flags})
    except ValidationError as exc:
        problems = [
            "tracing."
            + ".".join(str(p) for p in e["loc"])
            + ": "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        ]
        raise ValueError("; ".join(problems)) from None
